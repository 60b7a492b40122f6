"""GPU / TensorRT / Jetson tests, selected explicitly: ``pytest hardware_tests --profile l4``.

Each test skips with its reason where the hardware or the runtime is absent. Sessions
assert the execution provider really in use: ONNX Runtime silently falls back to the CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser):
    parser.addoption("--profile", default=None, help="hardware profile to test (edgekit profiles list)")


@pytest.fixture(scope="session")
def profile(request):
    from edgekit.doctor import detect, fitting_profile
    from edgekit.profiles import load_profile

    machine = detect()
    name = request.config.getoption("--profile") or fitting_profile(machine)
    if name is None:
        pytest.skip("no --profile given and no shipped profile fits this machine")
    chosen = load_profile(name)
    if not chosen.is_gpu:
        pytest.skip(f"profile {name} is not a GPU profile")
    if not machine.gpus:
        pytest.skip("no NVIDIA GPU on this machine")
    return chosen


@pytest.fixture(scope="session")
def machine():
    from edgekit.doctor import detect

    return detect()


@pytest.fixture(scope="session")
def export_for(tmp_path_factory):
    from edgekit.export import export_model

    made = {}

    def make(target: str, dtype: str):
        if (target, dtype) not in made:
            out = tmp_path_factory.mktemp("hw") / f"tiny-qwen3-{target}-{dtype}"
            export_model("tiny-qwen3", out, target=target, dtype=dtype)
            made[(target, dtype)] = out
        return made[(target, dtype)]

    return make


# -- native TensorRT (test_tensorrt_session.py, test_tensorrt_engines.py) ----------------------

SHAPES = {"batch": (1, 1, 1), "prompt": (1, 16, 64), "context": (1, 128, 256)}


def _need(*modules: str) -> None:
    for module in modules:
        if importlib.util.find_spec(module.split(".")[0]) is None:
            pytest.skip(f"{module} is not installed here")


@pytest.fixture(scope="session")
def cuda_ready(profile):
    from edgekit.errors import MissingDependencyError
    from edgekit.runtimes.cuda_stream import _cudart

    try:
        _cudart()
    except MissingDependencyError as exc:
        pytest.skip(f"cuda-python: {exc.message}")
    return profile


@pytest.fixture(scope="session")
def trt_profile(cuda_ready):
    """The chosen profile with small shapes; skips without TensorRT."""
    from edgekit.profiles import ShapeRange
    from edgekit.runtimes import tensorrt

    reason = tensorrt.is_available()
    if reason:
        pytest.skip(f"TensorRT: {reason}")
    return dataclasses.replace(cuda_ready, shapes={k: ShapeRange(*v) for k, v in SHAPES.items()})


@pytest.fixture(scope="session")
def export_of(tmp_path_factory):
    """factory(preset, target, mtp=False) -> an fp32 export of a tiny preset (needs the export stack);
    ``mtp``: with its MTP head inside the graph (tiny-code-mtp)."""
    made = {}

    def make(preset: str, target: str = "decomposed", mtp: bool = False):
        _need("torch", "transformers", "onnxscript", "onnxruntime")
        from edgekit.export import export_model

        if (preset, target, mtp) not in made:
            out = tmp_path_factory.mktemp("trt-session") / f"{preset}-{target}{'-mtp' if mtp else ''}"
            export_model(preset, out, target=target, dtype="fp32", mtp=mtp)
            made[(preset, target, mtp)] = out
        return made[(preset, target, mtp)]

    return make


@pytest.fixture(scope="session")
def small_profile(trt_profile, tmp_path_factory):
    """The chosen profile's TOML with small shapes (SHAPES), so each plan builds in seconds."""
    import re

    text = trt_profile.path.read_text()
    for key, (low, opt, high) in SHAPES.items():
        text = re.sub(rf"(?m)^{key} = .*$", f"{key} = [{low}, {opt}, {high}]", text)
    path = tmp_path_factory.mktemp("profile") / f"{trt_profile.name}.toml"
    path.write_text(text)
    return path


PROMPT_IDS = "3,17,42,7,99,100,5,64,12,8,250,31,77,4,9,2"  # 16 ids: within the small profile's prompt max


@pytest.fixture(scope="session")
def run_tokens():
    """factory(path, *extra) -> `edgekit run PATH --prompt-ids PROMPT_IDS --max-new-tokens 16 --json`'s object."""
    import json
    import subprocess
    import sys

    def run(path, *extra) -> dict:
        result = subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", "run", str(path),
                                 "--prompt-ids", PROMPT_IDS, "--max-new-tokens", "16", "--json", *extra],
                                check=False, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout)

    return run
