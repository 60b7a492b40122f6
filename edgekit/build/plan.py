"""The build plan: every decision of ``edgekit build`` as plain data, checked before building.

A plan is made (and refused) the same way on any machine, so ``--dry-run`` on a workstation
shows exactly what the Jetson would build. Only the vendor call needs the target hardware.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from edgekit._files import model_bytes
from edgekit.errors import ConfigError, EdgekitError, did_you_mean
from edgekit.profiles import Profile, ShapeRange
from edgekit.quantize import DEFAULT_ACCURACY_LEVEL, DEFAULT_BLOCK_SIZE, METHOD_CHOICES, QUANT_CHOICES, QuantSettings
from edgekit.types import ExportedGraph

RUNTIME_CHOICES = ("ort", "ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
PRECISION_CHOICES = ("fp32", "fp16", "bf16", "fp8", "int8")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1}
# Quantized weight bytes per fp32 byte: int8 plus a scale per row; int4 in blocks of 32 with an
# fp32 scale and a 4-bit zero point each (5.125 bits), a little over for tensors left in fp32.
QUANT_SHARE = {"none": 1.0, "int8": 0.27, "int4": 0.18}
# Share of the profile's memory a build may plan to use: the OS, the runtime's own buffers
# and activations need the rest (Jetson shares its memory with the CPU).
MEMORY_SHARE = {"cpu": 0.8, "gpu": 0.9, "jetson": 0.75}
# First TensorRT versions whose ONNX parser takes these opset-23 ops.
TENSORRT_OP_VERSIONS = {"Attention": (10, 14), "RotaryEmbedding": (10, 15), "RMSNormalization": (10, 15)}


class BuildRefused(EdgekitError):
    """The plan cannot be built for this profile."""


@dataclass(frozen=True)
class BuildPlan:
    """What ``build_engine`` will do, as data."""

    export: str
    export_target: str
    export_dtype: str
    profile: str
    device: str
    runtime: str
    precision: str
    quantization: str
    requirements: dict[str, Any]
    memory: dict[str, Any]
    onnxruntime: dict[str, Any] | None
    tensorrt: dict[str, Any] | None
    # Weight-only quantization (ort-cpu): method, block size and MatMulNBits accuracy level for int4.
    quant_method: str | None = None
    quant_block_size: int | None = None
    quant_accuracy_level: int | None = None
    quant_lm_head: bool | None = None
    calibration: str | None = None
    quant_embeddings: bool | None = None
    # The batch / prompt / context ranges built for: the profile's, capped at the model's positions.
    shapes: dict[str, list[int]] | None = None
    notes: list[str] = field(default_factory=list)  # what the plan changed or assumed, for people to read

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(graph: ExportedGraph, profile: Profile, runtime: str | None = None,
              precision: str | None = None, quant: QuantOptions | None = None) -> BuildPlan:
    """Resolve defaults from the profile and check the combination; raises BuildRefused."""
    profile, notes = fit_positions(graph, profile)
    runtime = _runtime(profile, runtime)
    quantize = _quantization(graph, profile, runtime, precision, quant or QuantOptions())
    precision = _precision(profile, precision)
    _check_ops(graph, profile, runtime)
    _check_precision_fits_graph(graph, runtime, precision)
    memory = memory_estimate(graph, profile, precision, quantize.quantization)
    from edgekit.runtimes import onnxruntime_build, tensorrt

    return BuildPlan(
        export=str(graph.path), export_target=graph.target, export_dtype=graph.dtype,
        profile=profile.name, device=profile.device, runtime=runtime, precision=precision,
        quantization=quantize.quantization, requirements=_requirements(profile, runtime), memory=memory,
        onnxruntime=onnxruntime_build.plan_settings(graph, profile, runtime, precision) if runtime != "tensorrt" else None,
        tensorrt=tensorrt.plan_settings(graph, profile, precision) if runtime in ("tensorrt", "ort-tensorrt") else None,
        quant_method=quantize.method, quant_block_size=quantize.block_size,
        quant_accuracy_level=quantize.accuracy_level,
        quant_lm_head=quantize.lm_head if quantize.quantization != "none" else None, calibration=quantize.calibration,
        quant_embeddings=quantize.embeddings if quantize.quantization == "int4" else None,
        shapes={k: [v.min, v.opt, v.max] for k, v in profile.shapes.items()}, notes=notes,
    )


def fit_positions(graph: ExportedGraph, profile: Profile) -> tuple[Profile, list[str]]:
    """``profile`` with its prompt and context ranges capped at the model's positions, and a note per cap.

    A model cannot attend past ``max_position_embeddings``: planning a longer context would size
    the KV cache (and TensorRT's shape profile) for tokens it can never hold.
    """
    positions = graph.model.max_position_embeddings
    shapes, notes = dict(profile.shapes), []
    for key in ("prompt", "context"):
        r = shapes[key]
        if r.max > positions:
            shapes[key] = ShapeRange(min(r.min, positions), min(r.opt, positions), positions)
            notes.append(f"{key} capped at the model's {positions} positions (profile {profile.name}: "
                         f"{r.min}/{r.opt}/{r.max})")
    return dataclasses.replace(profile, shapes=shapes), notes


@dataclass(frozen=True)
class QuantOptions:
    """What the user asked for (``None`` = the profile's default)."""

    quantization: str | None = None  # none | int8 | int4
    method: str | None = None  # rtn | gptq
    block_size: int | None = None
    lm_head: bool = True
    calibration: str | None = None
    embeddings: bool = True  # int4: the embedding table too; most of a 0.6B model's bytes are its vocabulary


def _quantization(graph: ExportedGraph, profile: Profile, runtime: str, precision: str | None,
                  asked: QuantOptions) -> QuantSettings:
    """Weight-only quantization: the profile's default on CPU profiles unless --precision is given."""
    quant = asked.quantization
    if graph.quantization:  # quantized by `edgekit export --quant`: its MatMuls are MatMulNBits already
        if quant not in (None, "none"):
            raise BuildRefused(f"{graph.path} was quantized to {graph.quantization['quantization']} at export; "
                               f"--quant {quant} would quantize it twice",
                               "build it with --quant none, or re-export without --quant")
        quant = "none"
    if quant is None:
        default = profile.defaults["quantization"] if profile.device == "cpu" and precision is None else "none"
        quant = default if graph.dtype == "fp32" else "none"
    if quant not in QUANT_CHOICES:
        raise ConfigError(f"--quant {quant!r} is not one of {', '.join(QUANT_CHOICES)}{did_you_mean(quant, list(QUANT_CHOICES))}",
                          f"use one of: {', '.join(QUANT_CHOICES)}")
    if quant == "none":
        return QuantSettings("none")
    if runtime != "ort-cpu":
        raise BuildRefused(f"--quant {quant} is built for ONNX Runtime's CPU EP only so far, not {runtime}",
                           "use a CPU profile (--runtime ort), or --quant none")
    if quant not in profile.hardware["precisions"]:
        raise BuildRefused(f"{quant} is not among {profile.name}'s precisions", f"use one of: {', '.join(profile.hardware['precisions'])}")
    if graph.dtype != "fp32":
        raise BuildRefused(f"--quant {quant} quantizes an fp32 export; {graph.path} is {graph.dtype}",
                           "re-export with --dtype fp32")
    method = asked.method or "rtn"
    if method not in METHOD_CHOICES:
        raise ConfigError(f"--quant-method {method!r} is not one of {', '.join(METHOD_CHOICES)}",
                          f"use one of: {', '.join(METHOD_CHOICES)}")
    if quant == "int8":
        return QuantSettings("int8", lm_head=asked.lm_head)
    if method == "gptq" and asked.calibration is None:
        raise BuildRefused("--quant-method gptq needs calibration text", "pass --calibration TEXTFILE, or --quant-method rtn")
    if method == "gptq" and not asked.lm_head:  # ORT's GPTQ path ignores nodes_to_exclude
        raise BuildRefused("--no-quant-lm-head is not supported with --quant-method gptq", "use --quant-method rtn")
    block = asked.block_size or profile.defaults.get("quant_block_size", DEFAULT_BLOCK_SIZE)
    if block < 16 or block & (block - 1):
        raise ConfigError(f"--block-size {block} must be a power of two >= 16", "e.g. --block-size 32 (or 128: smaller files)")
    return QuantSettings("int4", method=method, block_size=block,
                         accuracy_level=profile.defaults.get("quant_accuracy_level", DEFAULT_ACCURACY_LEVEL),
                         lm_head=asked.lm_head, calibration=str(asked.calibration) if asked.calibration else None,
                         embeddings=asked.embeddings)


def _runtime(profile: Profile, runtime: str | None) -> str:
    if runtime is None:
        return profile.defaults["runtimes"][0]
    if runtime not in RUNTIME_CHOICES:
        raise ConfigError(f"--runtime {runtime!r} is not one of {', '.join(RUNTIME_CHOICES)}{did_you_mean(runtime, list(RUNTIME_CHOICES))}",
                          f"use one of: {', '.join(RUNTIME_CHOICES)}")
    if runtime == "ort":
        runtime = next((r for r in profile.defaults["runtimes"] if r.startswith("ort-")), "ort-cpu")
    if profile.device == "cpu" and runtime != "ort-cpu":
        raise BuildRefused(f"runtime {runtime} needs an NVIDIA GPU; profile {profile.name} is a CPU",
                           "use --runtime ort on CPU profiles, or a GPU profile (edgekit profiles list)")
    return runtime


def _precision(profile: Profile, precision: str | None) -> str:
    precision = precision or profile.defaults["precision"]
    if precision not in PRECISION_CHOICES:
        raise ConfigError(f"--precision {precision!r} is not one of {', '.join(PRECISION_CHOICES)}",
                          f"use one of: {', '.join(PRECISION_CHOICES)}")
    supported = profile.hardware["precisions"]
    if precision not in supported:
        where = f"compute capability {profile.hardware['compute_capability']}" if profile.is_gpu else "this CPU class"
        why = " (FP8 needs compute capability 8.9+)" if precision == "fp8" else ""
        raise BuildRefused(
            f"precision {precision} is not supported by {profile.name} ({where}){why}",
            f"use one of: {', '.join(p for p in supported if p in PRECISION_CHOICES)}",
        )
    return precision


def _check_ops(graph: ExportedGraph, profile: Profile, runtime: str) -> None:
    if runtime in ("tensorrt", "ort-tensorrt") and graph.custom_ops:
        raise BuildRefused(
            f"TensorRT cannot parse {', '.join(graph.custom_ops)} in {graph.path} (exported for --target {graph.target})",
            "re-export with --target portable (TensorRT >= 10.15) or --target decomposed (TensorRT 10.3, JetPack 6)",
        )
    if runtime in ("tensorrt", "ort-tensorrt"):
        floor = tuple(int(p) for p in profile.tensorrt["min_version"].split(".")[:2])
        too_new = sorted(op for op, since in TENSORRT_OP_VERSIONS.items() if op in graph.ops and floor < since)
        if too_new:
            raise BuildRefused(
                f"{', '.join(too_new)} in {graph.path} need a newer TensorRT than {profile.name}'s "
                f"{profile.tensorrt['min_version']} can parse",
                "re-export with --target decomposed, which uses plain ONNX ops only",
            )
    if runtime == "ort-cuda" and graph.target != "ort":
        raise BuildRefused(
            f"{graph.path} was exported for --target {graph.target}; ONNX Runtime's CUDA EP has been seen "
            "running opset-23 Attention on the CPU",
            "re-export with --target ort (GroupQueryAttention) for ort-cuda",
        )


def _check_precision_fits_graph(graph: ExportedGraph, runtime: str, precision: str) -> None:
    if precision in ("fp8", "int8") and "QuantizeLinear" not in graph.ops:
        raise BuildRefused(
            f"precision {precision} needs a graph with Q/DQ nodes; {graph.path} has none",
            "use --precision fp16 (or bf16); quantized builds come from quantization",
        )
    if runtime.startswith("ort-") and runtime != "ort-tensorrt" and precision != graph.dtype and precision not in ("fp8", "int8"):
        raise BuildRefused(
            f"ONNX Runtime runs the graph in the dtype it was exported in ({graph.dtype}), not {precision}",
            f"re-export with --dtype {precision}, or pass --precision {graph.dtype}",
        )


def memory_estimate(graph: ExportedGraph, profile: Profile, precision: str, quantization: str = "none") -> dict[str, Any]:
    """Weights + KV cache at the profile's max context and batch, against its memory; refuses over budget."""
    stored = model_bytes(graph.model_path)
    weights = int(stored * BYTES[precision] / BYTES[graph.dtype]) if precision in ("fp16", "bf16") else stored
    weights = int(weights * QUANT_SHARE[quantization])
    kv_dtype = "fp32" if precision == "fp32" else "fp16"
    context, batch = profile.shapes["context"].max, profile.shapes["batch"].max
    per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in graph.layers if layer.has_kv) * BYTES[kv_dtype]
    # Linear-attention layers hold fixed-size states (the recurrent one in fp32) whatever the context.
    fixed = sum(math.prod(shape) * (4 if part == "recurrent" else BYTES[kv_dtype])
                for layer in graph.layers if not layer.has_kv for part, shape in layer.states.items())
    kv = (per_token * context + fixed) * batch
    budget = int(profile.hardware["memory_gb"] * 1e9 * MEMORY_SHARE[profile.device])
    estimate = {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv,
                "budget_bytes": budget, "context": context, "batch": batch}
    if weights + kv > budget:
        raise BuildRefused(
            f"weights {weights / 1e9:.2f} GB + KV cache at {context} tokens x batch {batch} {kv / 1e9:.2f} GB "
            f"exceed {MEMORY_SHARE[profile.device]:.0%} of {profile.name}'s {profile.hardware['memory_gb']:g} GB "
            f"({budget / 1e9:.2f} GB)",
            "lower [shapes].context in a profile of your own (--profile board.toml), quantize, or pick a bigger profile",
        )
    return estimate


def _requirements(profile: Profile, runtime: str) -> dict[str, Any]:
    req: dict[str, Any] = {"device": profile.device}
    if profile.is_gpu:
        req["compute_capability"] = profile.hardware["compute_capability"]
    else:
        req["cpu_flags"] = list(profile.hardware["cpu_flags"])
    if runtime in ("tensorrt", "ort-tensorrt"):
        req["tensorrt"] = ">=" + profile.tensorrt["min_version"]  # the build pins the exact version it used
    if runtime.startswith("ort-"):
        from edgekit.runtimes.onnxruntime_build import PROVIDERS

        req["onnxruntime_provider"] = PROVIDERS[runtime]
    return req
