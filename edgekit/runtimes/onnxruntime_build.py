"""ONNX Runtime builds: session settings from the profile, and the build per execution provider.

    ort-cpu       the graph optimized once (ORT_ENABLE_EXTENDED, portable across CPUs of the
                  profile) and saved, so the device loads without re-optimizing
    ort-cuda      the graph as exported (GroupQueryAttention), provider options from the profile
    ort-tensorrt  an EP-context model: TensorRT's engine embedded in model_ctx.onnx, so the
                  device never recompiles at start (built on the target GPU)
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from edgekit._files import model_files
from edgekit.errors import RuntimeUnavailableError, require
from edgekit.profiles import Profile
from edgekit.types import ExportedGraph

PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
             "ort-tensorrt": "TensorrtExecutionProvider"}
CONTEXT_MODEL = "model_ctx.onnx"


def plan_settings(graph: ExportedGraph, profile: Profile, runtime: str, precision: str) -> dict[str, Any]:
    """Providers, provider options and threads for ``runtime`` on ``profile``, as data."""
    provider = PROVIDERS[runtime]
    options = dict(profile.onnxruntime.get("provider_options", {}))
    if profile.onnxruntime["execution_provider"] != provider:
        options = {}
    if runtime == "ort-tensorrt":
        options.update(_tensorrt_ep_options(graph, profile, precision))
    providers = [provider] if runtime == "ort-cpu" else [provider, "CPUExecutionProvider"]
    return {
        "providers": providers,
        "provider_options": [options] + [{}] * (len(providers) - 1),
        "intra_op_threads": profile.onnxruntime["intra_op_threads"],
        "model_file": CONTEXT_MODEL if runtime == "ort-tensorrt" else "model.onnx",
        "saved_optimization_level": "ORT_ENABLE_EXTENDED" if runtime == "ort-cpu" else None,
    }


def _tensorrt_ep_options(graph: ExportedGraph, profile: Profile, precision: str) -> dict[str, Any]:
    from edgekit.runtimes.tensorrt import shape_profile

    shapes = shape_profile(graph, profile)
    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in shapes.items())
    return {
        "trt_fp16_enable": precision == "fp16",
        "trt_bf16_enable": precision == "bf16",
        "trt_max_workspace_size": profile.tensorrt["workspace_mb"] << 20,
        "trt_builder_optimization_level": profile.tensorrt["builder_optimization_level"],
        "trt_engine_cache_enable": True,
        "trt_timing_cache_enable": True,
        "trt_dump_ep_context_model": True,
        "trt_ep_context_file_path": CONTEXT_MODEL,
        "trt_ep_context_embed_mode": 1,
        "trt_profile_min_shapes": spec("min"),
        "trt_profile_opt_shapes": spec("opt"),
        "trt_profile_max_shapes": spec("max"),
    }


def build(graph: ExportedGraph, runtime: str, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the model file(s) for ``runtime`` into ``out``; returns what the sidecar records."""
    ort = require("onnxruntime", "cpu")
    if runtime == "ort-cpu":
        _optimize(ort, graph, out)
    elif runtime == "ort-cuda":
        _copy_model(graph, out)
        check_provider(ort, out / "model.onnx", settings)
    else:
        _copy_model(graph, out)
        _compile_context_model(ort, out, settings)
    return {"onnxruntime_version": ort.__version__}


def _optimize(ort, graph: ExportedGraph, out: Path) -> None:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(out / "model.onnx")
    if len(model_files(graph.model_path)) > 1:  # the export keeps its weights in external data
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(graph.model_path), options, providers=["CPUExecutionProvider"])


def _copy_model(graph: ExportedGraph, out: Path) -> None:
    for source in model_files(graph.model_path):
        shutil.copy(source, out / source.name)


def check_provider(ort, model: Path, settings: dict[str, Any], options=None):
    """Open ``model`` on the planned providers and insist the first one is really in use.

    ONNX Runtime silently falls back to the CPU when a provider cannot start.
    """
    session = ort.InferenceSession(str(model), options, providers=settings["providers"],
                                   provider_options=settings["provider_options"])
    wanted = settings["providers"][0]
    if session.get_providers()[0] != wanted:
        raise RuntimeUnavailableError(
            f"ONNX Runtime fell back to {session.get_providers()[0]}: {wanted} does not work here",
            "install onnxruntime-gpu (not together with onnxruntime) with matching CUDA / TensorRT, on the target GPU",
        )
    return session


def _compile_context_model(ort, out: Path, settings: dict[str, Any]) -> None:
    options = dict(settings["provider_options"][0])
    options["trt_ep_context_file_path"] = str(out / CONTEXT_MODEL)
    options["trt_engine_cache_path"] = str(out / "trt_cache")
    options["trt_timing_cache_path"] = str(out / "trt_cache")
    compiled = {**settings, "provider_options": [options, *settings["provider_options"][1:]]}
    check_provider(ort, out / "model.onnx", compiled)
    if not (out / CONTEXT_MODEL).exists():
        raise RuntimeUnavailableError("the TensorRT EP did not write an EP-context model",
                                      "check that onnxruntime-gpu's TensorRT EP matches TensorRT 10")
