"""GPU precisions on the GPU: each precision TensorRT (and ONNX Runtime CUDA) builds for the local
GPU's profile, run there, with greedy parity (fp16 / bf16) or quality on held-out text (int4 / fp8)
against the fp32 PyTorch reference; a weight-stripped int4 plan refits from its build folder's graph.

The graphs are the ones CPU tests check (tests/engines/test_gpu_precisions.py); here the vendor
build and the numbers on the device are what is tested. Skips, with the reason, without TensorRT,
cuda-python, onnxruntime-gpu or the export stack (fixtures in conftest.py).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PRESET = "tiny-code"  # trained: greedy tokens and perplexity mean something
# The bars for int4 weight-only (RTN, block 128); fp8 is held to the same.
MAX_PERPLEXITY_INCREASE = {"int4": 0.03, "fp8": 0.03}
MIN_TOP1 = {"int4": 0.90, "fp8": 0.90}


def edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, timeout=600)


def _build(export, profile, out, runtime: str, precision: str, *extra) -> dict:
    built = edgekit("build", str(export), "--profile", str(profile), "--runtime", runtime, "--precision", precision,
                    "-o", str(out), "--json", *extra)
    assert built.returncode == 0, built.stderr[-3000:]
    return json.loads(built.stdout)


def _tensorrt_precisions(profile) -> list[str]:
    return [p for p in ("fp16", "bf16", "int4", "fp8") if p in profile.hardware["precisions"]]


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int4", "fp8"])
def test_tensorrt_precision_runs_on_the_gpu(run_tokens, precision, trt_profile, small_profile, export_of, tmp_path):
    if precision not in _tensorrt_precisions(trt_profile):
        pytest.skip(f"{trt_profile.name} has no {precision} ({trt_profile.hardware['compute_capability']})")
    from edgekit.export.presets import TRAINED

    export = export_of(PRESET)
    heldout = TRAINED[PRESET] / "heldout.txt"
    extra = ("--calibration", str(heldout)) if precision == "fp8" else ()
    sidecar = _build(export, small_profile, tmp_path / precision, "tensorrt", precision, *extra)
    assert sidecar["flags"] == [] and sidecar["graph"]["precision"] == precision  # strongly typed, from the graph
    on_gpu = run_tokens(tmp_path / precision)
    assert on_gpu["runtime"].startswith("TensorRT"), on_gpu["runtime"]  # not a silent CPU fallback
    if precision in ("fp16", "bf16"):
        want = run_tokens(export)["token_ids"]
        assert on_gpu["token_ids"][:8] == want[:8], (on_gpu["token_ids"], want)
        return
    from edgekit.quality import measure_quality

    report = measure_quality(tmp_path / precision, PRESET, heldout, max_tokens=None, window=128)
    print(precision, json.dumps(report.to_dict()))
    assert report.perplexity_increase <= MAX_PERPLEXITY_INCREASE[precision], report
    assert report.top1_agreement >= MIN_TOP1[precision], report


def test_stripped_int4_plan_refits_from_its_graph(run_tokens, trt_profile, small_profile, export_of, tmp_path):
    export = export_of(PRESET)
    stripped = _build(export, small_profile, tmp_path / "stripped", "tensorrt", "int4", "--strip-weights")
    assert (tmp_path / "stripped" / "model.onnx").is_file() and stripped["tensorrt"]["refit_from"] == "model.onnx"
    full = _build(export, small_profile, tmp_path / "full", "tensorrt", "int4")
    assert full.get("graph_kept") is False and not (tmp_path / "full" / "model.onnx").exists()
    refitted, whole = run_tokens(tmp_path / "stripped"), run_tokens(tmp_path / "full")
    assert refitted["runtime"].startswith("TensorRT") and refitted["token_ids"] == whole["token_ids"]


@pytest.mark.parametrize("precision", ["fp16", "int4", "int8"])
def test_ort_cuda_precision_runs_on_the_gpu(run_tokens, precision, profile, machine, export_of, tmp_path):
    from edgekit.runtimes.registry import get_runtime

    reason = get_runtime("ort-cuda").is_available()
    if reason:
        pytest.skip(f"ort-cuda: {reason}")
    export = export_of(PRESET, "ort")
    _build(export, profile.path, tmp_path / precision, "ort-cuda", precision)
    on_gpu = run_tokens(tmp_path / precision)
    assert "CUDAExecutionProvider" in on_gpu["runtime"], on_gpu["runtime"]
    if precision == "fp16":
        assert on_gpu["token_ids"][:8] == run_tokens(export)["token_ids"][:8]
