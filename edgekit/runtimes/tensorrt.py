"""Native TensorRT: shape profiles and builder settings as data, and the build itself.

Everything up to ``build`` runs anywhere (plain data, tested on CPU); ``build`` imports
the tensorrt Python package and needs the target GPU. TensorRT's min/opt/max shape object
is called ShapeProfile here; "profile" alone means a hardware profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, RuntimeUnavailableError
from edgekit.profiles import Profile
from edgekit.types import ExportedGraph, state_io

# No precision builder flags: TensorRT 11 removed FP16 / BF16 / INT8 / FP8 (weak typing was
# deprecated in 10.12). The network is strongly typed and its precision is the graph's
# (edgekit.engines.gpu_graph), so one ONNX file builds alike on 10.3 (JetPack 6) and 11.x.
FLAGS: list[str] = []
HW_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def is_available() -> str | None:
    """None when the tensorrt package imports, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT's Python package is not installed ({exc}); install it on the device (JetPack ships it)"
    return None


def shape_profile(graph: ExportedGraph, profile: Profile) -> dict[str, dict[str, list[int]]]:
    """One ShapeProfile per graph input: min / opt / max from the hardware profile's ranges.

    opt is a decode step at the profile's opt context, the shape a device spends its time in;
    prefill up to the prompt max runs within the same profile.
    """
    b, p, c = (profile.shapes[k] for k in ("batch", "prompt", "context"))
    shapes = {
        "input_ids": {"min": [b.min, 1], "opt": [b.opt, 1], "max": [b.max, p.max]},
        "attention_mask": {"min": [b.min, 1], "opt": [b.opt, c.opt], "max": [b.max, c.max]},
    }
    for io in state_io(graph.layers):
        layer = io.layer
        if layer.has_kv:
            kv, d = layer.num_kv_heads, layer.head_dim
            shapes[io.past] = {"min": [b.min, kv, 0, d], "opt": [b.opt, kv, c.opt - 1, d], "max": [b.max, kv, c.max - 1, d]}
        else:  # fixed-size recurrent / conv state
            fixed = layer.states[io.part]
            shapes[io.past] = {"min": [b.min, *fixed], "opt": [b.opt, *fixed], "max": [b.max, *fixed]}
    return shapes


def plan_settings(graph: ExportedGraph, profile: Profile, precision: str, strip_weights: bool = False) -> dict[str, Any]:
    """Builder settings for ``precision`` on ``profile``, as data.

    ``strip_weights``: a weight-stripped plan (TensorRT >= 10.0) that the session refits at load
    from the ONNX file it was parsed from, ``refit_from``: the export's, or the GPU graph the build
    folder keeps for a GPU precision; one copy of the weights then serves every plan.
    """
    trt = profile.tensorrt
    return {
        "flags": list(FLAGS),
        "strongly_typed": True,  # precision comes from the graph
        "workspace_bytes": trt["workspace_mb"] << 20,
        "builder_optimization_level": trt["builder_optimization_level"],
        "hardware_compatibility": trt["hardware_compatibility"],
        "version_compatible": trt["version_compatible"],
        "dla_core": trt.get("dla_core", -1),
        "min_version": trt["min_version"],
        "timing_cache": "timing.cache",
        "plan_file": "model.plan",
        "shape_profile": shape_profile(graph, profile),
        "strip_weights": strip_weights,
        "refit_from": graph.model_file if strip_weights else None,
    }


def build(graph: ExportedGraph, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Parse ``graph``'s ONNX file (the build folder's GPU graph for a GPU precision, else the
    export's), build and serialize the plan into ``out``; returns what the sidecar records."""
    reason = is_available()
    if reason:
        raise RuntimeUnavailableError(f"cannot build a TensorRT plan here: {reason}",
                                      "run `edgekit build --runtime tensorrt` on the target device")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(graph.model_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} cannot parse {graph.model_path}: {errors}",
                                      "re-export with --target decomposed")
    config = _config(trt, builder, settings, out)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeUnavailableError("TensorRT's builder failed (see its log above)",
                                      "lower [tensorrt].workspace_mb or [shapes] maxima in the profile")
    (out / settings["plan_file"]).write_bytes(bytes(plan))
    _save_timing_cache(config, out / settings["timing_cache"])
    return {"tensorrt_version": trt.__version__, "flags": settings["flags"],
            "strip_weights": bool(settings.get("strip_weights"))}


def network_flags(trt) -> int:
    """STRONGLY_TYPED where the bindings have it (TensorRT >= 9; accepted and ignored by 11.x,
    where every network is strongly typed): tensor types follow the graph, never the builder."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 0 if flag is None else 1 << int(flag)


def _config(trt, builder, settings: dict[str, Any], out: Path):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    config.builder_optimization_level = settings["builder_optimization_level"]
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings["version_compatible"]:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
    if settings.get("strip_weights"):
        _strip_weights(trt, config)
    config.hardware_compatibility_level = getattr(trt.HardwareCompatibilityLevel, HW_COMPAT[settings["hardware_compatibility"]])
    if settings["dla_core"] >= 0:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = settings["dla_core"]
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    shapes = builder.create_optimization_profile()
    for name, dims in settings["shape_profile"].items():
        shapes.set_shape(name, dims["min"], dims["opt"], dims["max"])
    config.add_optimization_profile(shapes)
    cache_path = out / settings["timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    return config


def _strip_weights(trt, config) -> None:
    """Leave the refittable weights out of the plan; the session refits them from the export's ONNX."""
    if not hasattr(trt.BuilderFlag, "STRIP_PLAN"):
        raise RuntimeUnavailableError(f"TensorRT {trt.__version__} cannot build weight-stripped plans (10.0 added them)",
                                      "build a full plan (without strip_weights), or upgrade TensorRT")
    config.set_flag(trt.BuilderFlag.STRIP_PLAN)
    # The same weights come back at load, so the builder may still fold and fuse them as constants.
    config.set_flag(trt.BuilderFlag.REFIT_IDENTICAL)


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        path.write_bytes(bytes(cache.serialize()))



# First TensorRT versions whose ONNX parser takes these opset-23 ops.
TENSORRT_OP_VERSIONS = {"Attention": (10, 14), "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15)}


def parse_problems(graph: ExportedGraph, profile: Profile) -> list[EdgekitError]:
    """Why TensorRT's ONNX parser (at the profile's oldest version) would refuse ``graph``."""
    if graph.custom_ops:
        return [EdgekitError(
            f"TensorRT cannot parse {', '.join(graph.custom_ops)} in {graph.path} (exported for --target {graph.target})",
            "re-export with --target portable (TensorRT >= 10.15) or --target decomposed (TensorRT 10.3, JetPack 6)")]
    floor = tuple(int(p) for p in profile.tensorrt["min_version"].split(".")[:2])
    too_new = sorted(op for op, since in TENSORRT_OP_VERSIONS.items() if op in graph.ops and floor < since)
    if too_new:
        return [EdgekitError(
            f"{', '.join(too_new)} in {graph.path} need a newer TensorRT than {profile.name}'s "
            f"{profile.tensorrt['min_version']} can parse",
            "re-export with --target decomposed, which uses plain ONNX ops only")]
    return []


class TensorrtRuntime:
    """Native TensorRT as an edgekit runtime (``base.Runtime``): a plan built on the target GPU,
    run by ``tensorrt_session.TensorrtSession``."""

    names = ("tensorrt",)
    device = "gpu"
    extra = "tensorrt"
    family = "tensorrt"
    weight_quantization: tuple[str, ...] = ()
    kv_copies = 2  # present = concat(past, new) into the other buffer of a ping-pong pair
    strips_weights = True
    # TensorRT quantizes INT8 as weights and activations (its weight-only quantization is INT4):
    # --precision int8 is SmoothQuant W8A8 Q/DQ (engines.plan.gpu_recipe).
    int8_form = "w8a8"

    def is_available(self) -> str | None:
        reason = is_available()
        if reason is None:
            from edgekit.errors import MissingDependencyError
            from edgekit.runtimes.cuda_stream import _cudart

            try:
                _cudart()
            except MissingDependencyError as exc:
                return exc.message
        return reason

    def check(self, graph: ExportedGraph, profile: Profile, precision: str) -> list[EdgekitError]:
        return parse_problems(graph, profile)

    def plan(self, graph: ExportedGraph, profile: Profile, precision: str,
             options: dict[str, Any] | None = None) -> dict[str, Any]:
        strip = bool((options or {}).get("strip_weights"))
        return {"tensorrt": plan_settings(graph, profile, precision, strip_weights=strip)}

    def requirements(self, profile: Profile) -> dict[str, Any]:
        """TensorRT from the profile's floor (the build pins what it used); a hardware-compatible
        plan runs on any Ampere or newer GPU, not only the profile's."""
        req: dict[str, Any] = {"tensorrt": ">=" + profile.tensorrt["min_version"]}
        if profile.tensorrt["hardware_compatibility"] == "ampere_plus":
            req["compute_capability"] = ">=8.0"
        return req

    def environment_problems(self, machine: Any) -> list[str]:
        return []

    def build(self, graph: ExportedGraph, plan: Any, out: Path) -> dict[str, Any]:
        built = {**build(graph, plan.tensorrt, out), "model_file": plan.tensorrt["plan_file"]}
        # A plan loads only on the TensorRT that built it, unless built version-compatible (then
        # that version or a newer one runs it).
        version = built["tensorrt_version"]
        built["requirements"] = {"tensorrt": (">=" if plan.tensorrt["version_compatible"] else "") + version}
        if plan.tensorrt.get("strip_weights"):  # which weights refit it: checked at load, since a
            built["refit_files"] = refit_identity(graph.model_path)  # wrong file would refit silently
        return built

    def open(self, engine: Any, threads: int | None = None, memory_map: bool | None = None):
        """A session on the plan; a weight-stripped plan refits from the source export it was built
        from, or from the export a bundle unpacked beside it."""
        from edgekit.runtimes.onnxruntime_build import graph_only_error
        from edgekit.runtimes.tensorrt_session import TensorrtSession

        if engine.details.get("graph_only"):
            raise graph_only_error(engine)
        settings = engine.details["tensorrt"]
        # Where the weights may be: the source export, and the engines unpacked beside this one
        # (a bundle unpacks the export a stripped plan needs next to it).
        siblings = sorted(p for p in engine.path.parent.iterdir() if p.is_dir() and p != engine.path)
        folders = tuple(Path(p) for p in ((engine.source_export or {}).get("path"), *siblings) if p)
        return TensorrtSession(engine.graph, engine.path / settings["plan_file"], settings, refit_folders=folders,
                               refit_files=engine.details.get("refit_files"))


def refit_identity(model: Path) -> dict[str, dict[str, Any]]:
    """{file name: {bytes, sha256}} of an ONNX model and its external data: what refits a stripped plan."""
    from edgekit._files import model_files, sha256_file

    return {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in model_files(model)}


RUNTIME = TensorrtRuntime()
