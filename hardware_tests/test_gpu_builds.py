"""Build, validate and run per GPU profile, on the GPU itself."""

from __future__ import annotations

import pytest


def _needs_provider(machine, provider):
    state = machine.providers.get(provider)
    if state != "works":
        pytest.skip(f"{provider}: {state or 'not installed (pip install edgekit-llm[gpu])'}")


def test_ort_cuda_build_validates_on_the_gpu(profile, machine, export_for, tmp_path):
    from edgekit.engines import build_engine
    from edgekit.runtimes.registry import open_engine
    from edgekit.validate import validate

    _needs_provider(machine, "CUDAExecutionProvider")
    out = tmp_path / "cuda"
    build_engine(export_for("ort", "fp16"), profile.path, out, runtime="ort-cuda")
    session = open_engine(out)
    assert session.providers[0] == "CUDAExecutionProvider"
    report = validate(out, "tiny-qwen3", prompt_length=24, steps=32)
    assert report.passed, report


def test_ort_tensorrt_ep_writes_a_context_model(profile, machine, export_for, tmp_path):
    from edgekit.engines import build_engine
    from edgekit.runtimes.registry import open_engine

    _needs_provider(machine, "TensorrtExecutionProvider")
    if "ort-tensorrt" not in profile.defaults["runtimes"]:
        pytest.skip(f"{profile.name} does not list ort-tensorrt")
    out = tmp_path / "trt-ep"
    engine = build_engine(export_for("decomposed", "fp32"), profile.path, out, runtime="ort-tensorrt", precision="fp16")
    assert (out / "model_ctx.onnx").is_file() and engine.graph.model_file == "model_ctx.onnx"
    assert open_engine(out).providers[0] == "TensorrtExecutionProvider"


def test_native_tensorrt_plan(profile, machine, export_for, tmp_path):
    import json

    from edgekit.engines import build_engine

    if machine.tensorrt_version is None:
        pytest.skip("TensorRT is not installed")
    out = tmp_path / "plan"
    target = "portable" if tuple(map(int, profile.tensorrt["min_version"].split("."))) >= (10, 15) else "decomposed"
    build_engine(export_for(target, "fp32"), profile.path, out, runtime="tensorrt", precision="fp16")
    sidecar = json.loads((out / "edgekit.json").read_text())["build"]
    assert (out / "model.plan").stat().st_size > 0 and (out / "timing.cache").is_file()
    assert sidecar["tensorrt_version"] == machine.tensorrt_version and sidecar["flags"] == []  # strongly typed: fp16 is in the graph
