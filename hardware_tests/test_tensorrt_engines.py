"""Native TensorRT engines end to end, as a user drives them: `edgekit build --runtime tensorrt`,
then `edgekit run`, `edgekit bench` and a bundle of weight-stripped plans plus the export.

Skips where TensorRT, cuda-python or a GPU is missing (the fixtures in conftest.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

PROMPT_IDS = "3,17,42,7,99,100,5,64,12,8,250,31,77,4,9,2"  # 16 ids: within the small profile's prompt max


def edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def small_profile(trt_profile, tmp_path_factory):
    """The chosen profile's TOML with small shapes, so each plan builds in seconds."""
    text = trt_profile.path.read_text()
    text = re.sub(r"(?m)^prompt = .*$", "prompt = [1, 16, 64]", text)
    text = re.sub(r"(?m)^context = .*$", "context = [1, 128, 256]", text)
    text = re.sub(r"(?m)^batch = .*$", "batch = [1, 1, 1]", text)
    path = tmp_path_factory.mktemp("profile") / f"{trt_profile.name}.toml"
    path.write_text(text)
    return path


def _tokens(path, *extra) -> dict:
    result = edgekit("run", str(path), "--prompt-ids", PROMPT_IDS, "--max-new-tokens", "16", "--json", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_build_run_and_bench_a_native_plan(small_profile, export_of, tmp_path):
    export = export_of("tiny-qwen3")
    out = tmp_path / "trt"
    built = edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                    "--precision", "fp32", "-o", str(out))
    assert built.returncode == 0, built.stderr[-3000:]
    on_gpu, on_cpu = _tokens(out), _tokens(export)
    assert on_gpu["runtime"].startswith("TensorRT"), on_gpu["runtime"]  # not a silent CPU fallback
    assert on_gpu["token_ids"] == on_cpu["token_ids"]
    bench = edgekit("bench", str(out), "--prompt-lengths", "16", "--new-tokens", "16", "--runs", "2", "--json")
    assert bench.returncode == 0, bench.stderr[-3000:]
    report = json.loads(bench.stdout)
    print(json.dumps(report, indent=1)[:4000])


def test_a_bundle_of_stripped_plans_holds_the_weights_once(small_profile, export_of, tmp_path):
    export = export_of("tiny-qwen3")
    stripped = tmp_path / "stripped"
    built = edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                    "--precision", "fp32", "--strip-weights", "-o", str(stripped))
    assert built.returncode == 0, built.stderr[-3000:]
    bundle = tmp_path / "model.edgepkg"
    packed = edgekit("package", str(stripped), str(export), "-o", str(bundle))
    assert packed.returncode == 0, packed.stderr[-3000:]
    full = tmp_path / "full"
    assert edgekit("build", str(export), "--profile", str(small_profile), "--runtime", "tensorrt",
                   "--precision", "fp32", "-o", str(full)).returncode == 0
    weights = sum(p.stat().st_size for p in export.glob("model.onnx*"))
    plan, full_plan = (stripped / "model.plan").stat().st_size, (full / "model.plan").stat().st_size
    assert plan < full_plan - 0.5 * weights  # the weights are not in the stripped plan
    # One copy of the weights (the export's) beside plans that hold none; on a tiny model the
    # plan's own kernels are not small next to the weights, so they are counted apart.
    assert bundle.stat().st_size <= 1.15 * weights + plan
    on_gpu = _tokens(bundle, "--profile", small_profile.stem)
    assert on_gpu["runtime"].startswith("TensorRT")
    assert on_gpu["token_ids"] == _tokens(export)["token_ids"]
