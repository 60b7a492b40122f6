"""GPU / TensorRT / Jetson tests, selected explicitly: ``pytest hardware_tests --profile l4``.

Each test skips with its reason where the hardware or the runtime is absent. Sessions
assert the execution provider really in use: ONNX Runtime silently falls back to the CPU.
"""

from __future__ import annotations

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
