"""Native TensorRT: shape profiles and builder settings as data, and the build itself.

Everything up to ``build`` runs anywhere (plain data, tested on CPU); ``build`` imports
the tensorrt Python package and needs the target GPU. TensorRT's min/opt/max shape object
is called ShapeProfile here; "profile" alone means a hardware profile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import RuntimeUnavailableError
from edgekit.profiles import Profile
from edgekit.types import ExportedGraph, state_io

FLAGS = {"fp32": [], "fp16": ["FP16"], "bf16": ["BF16"], "fp8": ["FP8"], "int8": ["INT8"]}
HW_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def is_available() -> str | None:
    """None when the tensorrt package imports, else the reason."""
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT's Python package is not installed ({exc}); install it on the device (JetPack ships it)"
    return None


def version() -> str | None:
    """The installed TensorRT version, or None."""
    try:
        import tensorrt

        return tensorrt.__version__
    except ImportError:
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


def plan_settings(graph: ExportedGraph, profile: Profile, precision: str) -> dict[str, Any]:
    """Builder settings for ``precision`` on ``profile``, as data."""
    trt = profile.tensorrt
    return {
        "flags": FLAGS[precision],
        "workspace_bytes": trt["workspace_mb"] << 20,
        "builder_optimization_level": trt["builder_optimization_level"],
        "hardware_compatibility": trt["hardware_compatibility"],
        "version_compatible": trt["version_compatible"],
        "dla_core": trt.get("dla_core", -1),
        "min_version": trt["min_version"],
        "timing_cache": "timing.cache",
        "plan_file": "model.plan",
        "shape_profile": shape_profile(graph, profile),
    }


def build(graph: ExportedGraph, settings: dict[str, Any], out: Path) -> dict[str, Any]:
    """Parse the ONNX graph, build and serialize the plan into ``out``; returns what the sidecar records."""
    reason = is_available()
    if reason:
        raise RuntimeUnavailableError(f"cannot build a TensorRT plan here: {reason}",
                                      "run `edgekit build --runtime tensorrt` on the target device")
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
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
    return {"tensorrt_version": trt.__version__, "flags": settings["flags"]}


def _config(trt, builder, settings: dict[str, Any], out: Path):
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings["workspace_bytes"])
    config.builder_optimization_level = settings["builder_optimization_level"]
    for flag in settings["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    if settings["version_compatible"]:
        config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
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


def _save_timing_cache(config, path: Path) -> None:
    cache = config.get_timing_cache()
    if cache is not None:
        path.write_bytes(bytes(cache.serialize()))

