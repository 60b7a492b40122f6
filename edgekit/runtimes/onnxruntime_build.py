"""ONNX Runtime as edgekit runtimes: one ``OrtRuntime`` per execution provider, its settings from
the profile, and the build.

    ort-cpu       the graph optimized once (ORT_ENABLE_EXTENDED, portable across CPUs of the
                  profile) and saved, so the device loads without re-optimizing
    ort-cuda      the GPU graph (edgekit.engines.gpu_graph: fp16 / int4 / int8 in the graph, from the
                  ``ort`` export with GroupQueryAttention; int4 as DequantizeLinear(block) → MatMul,
                  which ONNX Runtime fuses into MatMulNBits with fp16 scales), provider options
                  from the profile
    ort-tensorrt  an EP-context model of the same GPU graph: TensorRT's engine embedded in
                  model_ctx.onnx, so the device never recompiles at start (built on the target GPU)
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit._files import model_files
from edgekit.errors import EdgekitError, RuntimeUnavailableError, require
from edgekit.profiles import Profile
from edgekit.types import ExportedGraph

CPU = "CPUExecutionProvider"
CONTEXT_MODEL = "model_ctx.onnx"
BF16_CACHES = "edgekit's ONNX Runtime sessions bind fp32 / fp16 caches only (NumPy has no bfloat16)"


@dataclass(frozen=True)
class OrtRuntime:
    """An ONNX Runtime execution provider as an edgekit runtime (``base.Runtime``); one module per
    provider sets ``RUNTIME = OrtRuntime(...)`` (``ort_cpu.py``, ``ort_cuda.py``, ``ort_tensorrt.py``)."""

    names: tuple[str, ...]
    provider: str
    device: str  # "cpu" | "gpu"
    extra: str
    family: str = "ort"  # `--runtime ort` picks the profile's first runtime of this family
    optimize: bool = False  # save the graph optimized once, so the device loads it as it is
    context_model: bool = False  # compile an EP-context model (the TensorRT EP's engine embedded)
    target: str | None = None  # the export target it needs, when only one works
    # (precision, why, what to use instead) it cannot build; GPU providers run the GPU graph edgekit makes.
    refuses: tuple[tuple[str, str, str], ...] = ()
    weight_quantization: tuple[str, ...] = ()  # --quant values it builds (MatMulNBits / dynamic int8)
    edits_graph: bool = False  # last-position logits and one tied LM head (edgekit.engines.graph_edits)
    kv_copies: int = 1  # the KV cache is one buffer, written in place or grown
    strips_weights: bool = False
    # GPU --precision int8: "weight_only" (DequantizeLinear → MatMul, fused to MatMulNBits) or
    # "w8a8" (SmoothQuant Q/DQ on weights and activations, as TensorRT takes INT8).
    int8_form: str = "weight_only"

    def is_available(self) -> str | None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            return f"onnxruntime is not installed ({exc})"
        if self.provider not in ort.get_available_providers():
            return f"this onnxruntime has no {self.provider} (install onnxruntime-gpu on the target GPU)"
        return None

    def check(self, graph: ExportedGraph, profile: Profile, precision: str) -> list[EdgekitError]:
        """Refusals for ``graph`` at ``precision`` on this provider."""
        from edgekit.runtimes.onnxruntime import NUMPY_DTYPES

        problems = []
        if graph.dtype not in NUMPY_DTYPES:  # OrtSession binds its cache in these dtypes only
            problems.append(EdgekitError(
                f"{graph.path} is a {graph.dtype} export; edgekit's ONNX Runtime sessions run "
                f"{' and '.join(NUMPY_DTYPES)} graphs", "re-export with --dtype fp16 (or fp32)"))
        if self.context_model:
            from edgekit.runtimes.tensorrt import parse_problems

            problems += parse_problems(graph, profile)
        if self.target and graph.target != self.target:
            problems.append(EdgekitError(
                f"{graph.path} was exported for --target {graph.target}; ONNX Runtime's {self.provider} "
                "has been seen running opset-23 Attention on the CPU",
                f"re-export with --target {self.target} (GroupQueryAttention) for {self.names[0]}"))
        if self.device == "cpu" and precision != graph.dtype:  # GPU providers get a GPU graph of ``precision``
            problems.append(EdgekitError(
                f"ONNX Runtime's CPU build runs the graph in the dtype it was exported in ({graph.dtype}), not {precision}",
                f"re-export with --dtype {precision}, or pass --precision {graph.dtype}"))
        for refused, why, instead in self.refuses:
            if precision == refused:
                problems.append(EdgekitError(f"{self.names[0]} cannot build --precision {precision}: {why}", instead))
        return problems

    def plan(self, graph: ExportedGraph, profile: Profile, precision: str,
             options: dict[str, Any] | None = None) -> dict[str, Any]:
        """This provider's part of the build plan, as data (it takes no ``options``)."""
        options = dict(profile.onnxruntime.get("provider_options", {}))
        if profile.onnxruntime["execution_provider"] != self.provider:
            options = {}
        plan: dict[str, Any] = {}
        if self.context_model:
            from edgekit.runtimes import tensorrt

            options.update(_tensorrt_ep_options(graph, profile, precision))
            plan["tensorrt"] = tensorrt.plan_settings(graph, profile, precision)
        providers = [self.provider] if self.provider == CPU else [self.provider, CPU]
        plan["onnxruntime"] = {
            "providers": providers,
            "provider_options": [options] + [{}] * (len(providers) - 1),
            "intra_op_threads": profile.onnxruntime["intra_op_threads"],
            "model_file": CONTEXT_MODEL if self.context_model else "model.onnx",
            "saved_optimization_level": "ORT_ENABLE_EXTENDED" if self.optimize else None,
        }
        return plan

    def requirements(self, profile: Profile) -> dict[str, Any]:
        """What a device needs beyond the profile's hardware."""
        req: dict[str, Any] = {"onnxruntime_provider": self.provider}
        if self.context_model:
            req["tensorrt"] = ">=" + profile.tensorrt["min_version"]
        return req

    def environment_problems(self, machine: Any) -> list[str]:
        """What this machine lacks to build, beyond the requirements."""
        if self.context_model and machine.tensorrt_version and not machine.tensorrt_version.startswith("10."):
            return [f"ONNX Runtime's TensorRT EP is built against TensorRT 10, found {machine.tensorrt_version}"]
        return []

    def build(self, graph: ExportedGraph, plan: Any, out: Path) -> dict[str, Any]:
        """Write the model file(s) into ``out``; returns what the sidecar records."""
        built = build(graph, self, plan.onnxruntime, out)
        return {**built, "model_file": plan.onnxruntime["model_file"]}

    def open(self, engine: Any, threads: int | None = None, memory_map: bool | None = None,
             profile_prefix: str | None = None):
        """The engine's session; ``profile_prefix`` turns ONNX Runtime's profiler on, writing its JSON
        there (:mod:`edgekit.bench.profile_step`; ``session.session.end_profiling()`` names the file)."""
        from edgekit.runtimes.onnxruntime import OrtSession

        if engine.details.get("graph_only"):
            raise graph_only_error(engine)
        return OrtSession(engine.graph, threads=threads, memory_map=memory_map,
                          settings=engine.details.get("onnxruntime"), profile_prefix=profile_prefix)


def graph_only_error(engine: Any) -> EdgekitError:
    """Opening a --graph-only build: it holds the graph, not the engine."""
    from edgekit.errors import ArtifactError

    source = (engine.source_export or {}).get("path", "EXPORT_DIR")
    return ArtifactError(f"{engine.path} holds the {engine.precision} graph only (built with --graph-only), "
                         f"no {engine.runtime} engine",
                         f"build the engine on the target: edgekit build {source} --profile {engine.profile} "
                         f"--runtime {engine.runtime} --precision {engine.precision} -o DIR")


def _tensorrt_ep_options(graph: ExportedGraph, profile: Profile, precision: str) -> dict[str, Any]:
    from edgekit.runtimes.tensorrt import shape_profile

    shapes = shape_profile(graph, profile)
    def spec(which: str) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[which]))}" for name, dims in shapes.items())
    # Precision is in the graph (strongly typed): with the fp16 / int8 switches off the EP creates
    # a strongly typed network (onnxruntime's TensorRT EP, 1.22+), as TensorRT 11 requires.
    return {
        "trt_fp16_enable": False,
        "trt_bf16_enable": False,
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


def build(graph: ExportedGraph, runtime: OrtRuntime, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Write the model file(s) for ``runtime`` into ``out``; returns what the sidecar records."""
    ort = require("onnxruntime", "cpu")
    if runtime.optimize:
        _optimize(ort, graph, out)
    elif runtime.context_model:
        _copy_model(graph, out)
        _compile_context_model(ort, out, settings)
    else:
        _copy_model(graph, out)
        check_provider(ort, out / "model.onnx", settings)
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
    """The export's files into ``out``; a GPU graph already made there stays as it is."""
    for source in model_files(graph.model_path):
        if source.resolve() != (out / source.name).resolve():
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
