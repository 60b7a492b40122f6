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

PRECISION_CHOICES = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1, "int8": 1, "int4": 1}
HALF = ("fp16", "bf16")
QUANTIZED = ("int4", "int8", "fp8")  # GPU precisions that quantize weights (fp8: activations too)
GPU_METHODS = ("rtn", "awq")
GPU_BLOCK_SIZE = 128  # TensorRT's INT4 weight-only default (ModelOpt's too)
# Which precision a refusal for memory suggests first: the most accurate one that fits.
FIT_ORDER = ("fp16", "bf16", "fp8", "int8", "int4")
# Share of the profile's memory a build may plan to use: the OS, the runtime's own buffers
# and activations need the rest (Jetson shares its memory with the CPU).
MEMORY_SHARE = {"cpu": 0.8, "gpu": 0.9, "jetson": 0.75}


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
    quant_lm_head_bits: int | None = None  # int4: 8 keeps the LM head (and a tied embedding) in 8 bits
    quant_symmetric: bool | None = None  # int4: no zero points (each level q is (q - 8) x scale)
    # The batch / prompt / context ranges built for: the profile's, capped at the model's positions.
    shapes: dict[str, list[int]] | None = None
    notes: list[str] = field(default_factory=list)  # what the plan changed or assumed, for people to read
    # GPU builds: how the runtime's graph is made from the export (engines.gpu_graph.GraphRecipe);
    # None: the export's graph as it is.
    graph: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_plan(graph: ExportedGraph, profile: Profile, runtime: str | None = None,
              precision: str | None = None, quant: QuantOptions | None = None,
              strip_weights: bool = False) -> BuildPlan:
    """Resolve defaults from the profile and check the combination; raises BuildRefused.

    ``strip_weights``: a plan without its weights, refitted at load (runtimes that can: TensorRT).
    """
    profile, notes = fit_positions(graph, profile)
    backend = resolve_runtime(profile, runtime)
    runtime = backend.names[0]
    asked = quant or QuantOptions()
    quantize = _quantization(graph, profile, backend, precision, asked)
    precision = _precision(profile, precision)
    recipe = gpu_recipe(graph, profile, precision, asked, backend) if profile.is_gpu else _cpu_precision(precision)
    for problem in backend.check(graph, profile, precision):
        raise BuildRefused(problem.message, problem.hint)
    if strip_weights and not backend.strips_weights:
        raise BuildRefused(f"--strip-weights applies to plans that refit at load, not {runtime}",
                           "use --runtime tensorrt, or drop --strip-weights")
    memory = memory_estimate(graph, profile, precision, quantize.quantization, backend.kv_copies,
                             recipe=recipe, quant=_quant_layout(quantize))
    settings = {"onnxruntime": None, "tensorrt": None,
                **backend.plan(graph, profile, precision, {"strip_weights": strip_weights})}
    return BuildPlan(
        export=str(graph.path), export_target=graph.target, export_dtype=graph.dtype,
        profile=profile.name, device=profile.device, runtime=runtime, precision=precision,
        quantization=quantize.quantization, requirements=_requirements(profile, backend), memory=memory,
        onnxruntime=settings["onnxruntime"], tensorrt=settings["tensorrt"],
        quant_method=quantize.method, quant_block_size=quantize.block_size,
        quant_accuracy_level=quantize.accuracy_level,
        quant_lm_head=quantize.lm_head if quantize.quantization != "none" else None, calibration=quantize.calibration,
        quant_embeddings=quantize.embeddings if quantize.quantization == "int4" else None,
        quant_lm_head_bits=quantize.lm_head_bits if quantize.quantization == "int4" and quantize.lm_head else None,
        quant_symmetric=quantize.symmetric if quantize.quantization == "int4" else None,
        shapes={k: [v.min, v.opt, v.max] for k, v in profile.shapes.items()}, notes=notes,
        graph=recipe.to_dict() if recipe else None,
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

    quantization: str | None = None  # none | int8 | int4 (ONNX Runtime CPU; GPU profiles: --precision)
    method: str | None = None  # rtn | gptq (CPU); rtn | awq (GPU int4 / int8)
    block_size: int | None = None
    lm_head: bool | None = None  # None: quantized, except fp8 (its LM head stays fp16)
    calibration: str | None = None
    # int4: the embedding table too; most of a 0.6B model's bytes are its vocabulary.
    # None: yes on CPU profiles, no on GPU ones (TensorRT gathers from a half-precision table).
    embeddings: bool | None = None
    lm_head_bits: int | None = None  # CPU int4: 4 (default) or 8 for the LM head and a tied embedding
    symmetric: bool | None = None  # CPU int4: no zero points (default: no, a zero point per block)


def _quantization(graph: ExportedGraph, profile: Profile, runtime: Any, precision: str | None,
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
    if quant not in runtime.weight_quantization:
        raise BuildRefused(f"--quant {quant} is ONNX Runtime's CPU EP quantization (MatMulNBits), not {runtime.names[0]}'s; "
                           f"GPU builds take their quantization from --precision",
                           f"use --precision {quant} ({quant} weight-only DequantizeLinear, fp16 activations), "
                           "or a CPU profile for --quant")
    if quant not in profile.hardware["precisions"]:
        raise BuildRefused(f"{quant} is not among {profile.name}'s precisions", f"use one of: {', '.join(profile.hardware['precisions'])}")
    if graph.dtype != "fp32":
        raise BuildRefused(f"--quant {quant} quantizes an fp32 export; {graph.path} is {graph.dtype}",
                           "re-export with --dtype fp32")
    method = asked.method or "rtn"
    lm_head = asked.lm_head is not False
    if method not in METHOD_CHOICES:
        raise ConfigError(f"--quant-method {method!r} is not one of {', '.join(METHOD_CHOICES)} on CPU profiles",
                          f"use one of: {', '.join(METHOD_CHOICES)} (awq is for GPU --precision int4 / int8)")
    if quant == "int8":
        return QuantSettings("int8", lm_head=lm_head)
    if method == "gptq" and asked.calibration is None:
        raise BuildRefused("--quant-method gptq needs calibration text", "pass --calibration TEXTFILE, or --quant-method rtn")
    if method == "gptq" and not lm_head:  # ORT's GPTQ path ignores nodes_to_exclude
        raise BuildRefused("--no-quant-lm-head is not supported with --quant-method gptq", "use --quant-method rtn")
    block = asked.block_size or profile.defaults.get("quant_block_size", DEFAULT_BLOCK_SIZE)
    if block < 16 or block & (block - 1):
        raise ConfigError(f"--block-size {block} must be a power of two >= 16", "e.g. --block-size 32 (or 128: smaller files)")
    head_bits = asked.lm_head_bits or 4
    if head_bits not in (4, 8):
        raise ConfigError(f"--lm-head-bits {head_bits} is not 4 or 8", "use --lm-head-bits 8 (closer to fp32) or 4")
    if head_bits == 8 and (method == "gptq" or not lm_head):
        raise BuildRefused("--lm-head-bits 8 needs --quant-method rtn and a quantized LM head",
                           "drop --lm-head-bits, or use --quant-method rtn without --no-quant-lm-head")
    symmetric = bool(asked.symmetric)
    if symmetric and method == "gptq":
        raise BuildRefused("--symmetric is for --quant-method rtn", "drop --symmetric, or use --quant-method rtn")
    return QuantSettings("int4", method=method, block_size=block, lm_head_bits=head_bits, symmetric=symmetric,
                         accuracy_level=profile.defaults.get("quant_accuracy_level", DEFAULT_ACCURACY_LEVEL),
                         lm_head=lm_head, calibration=str(asked.calibration) if asked.calibration else None,
                         embeddings=asked.embeddings is not False)


def resolve_runtime(profile: Profile, name: str | None) -> Any:
    """The runtime ``--runtime name`` means on ``profile`` (default: the profile's first; a family
    such as ``ort``: the profile's first of that family), refused where its device cannot run it."""
    from edgekit.runtimes.registry import get_runtime

    if name is None:
        runtime = get_runtime(profile.defaults["runtimes"][0], what=f"profile {profile.name}'s runtime")
    else:
        runtime = get_runtime(name, prefer=profile.defaults["runtimes"], what="--runtime")
    if (runtime.device == "cpu") != (profile.device == "cpu"):
        needs = "an NVIDIA GPU" if runtime.device == "gpu" else "a CPU profile"
        raise BuildRefused(f"runtime {runtime.names[0]} needs {needs}; profile {profile.name} is a {profile.device}",
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
        why = "FP8 needs compute capability 8.9+" if precision == "fp8" else "not in its [hardware].precisions"
        raise BuildRefused(
            f"precision {precision} is not supported by {profile.name} ({where}; {why})",
            f"use one of: {', '.join(p for p in supported if p in PRECISION_CHOICES)}",
        )
    return precision


def _cpu_precision(precision: str) -> None:
    """CPU profiles compute in fp32 (or the export's dtype); their quantization is --quant (no GPU graph: None)."""
    if precision in QUANTIZED:
        raise BuildRefused(
            f"--precision {precision} makes a GPU graph (Q/DQ for TensorRT / ONNX Runtime CUDA); "
            "CPU builds quantize with ONNX Runtime's CPU quantizers",
            "on CPU profiles use --quant int4 or --quant int8 (MatMulNBits / dynamic int8)" if precision != "fp8"
            else "on CPU profiles use --quant int4 or --quant int8; fp8 needs an sm_89 GPU profile")


def gpu_recipe(graph: ExportedGraph, profile: Profile, precision: str, asked: QuantOptions,
               runtime: Any = None) -> Any:
    """How the GPU graph for ``precision`` is made (``gpu_graph.GraphRecipe``), or None for the
    export's graph as it is (``precision`` is its dtype). Refuses what cannot be made.

    int8 takes the runtime's form (``runtime.int8_form``): weight-only DequantizeLinear where the
    runtime fuses it (ONNX Runtime CUDA: MatMulNBits), SmoothQuant W8A8 Q/DQ where INT8 means
    weights and activations (TensorRT, whose weight-only quantization is INT4 only).
    """
    from edgekit.engines.gpu_graph import GraphRecipe

    if graph.quantization:
        raise BuildRefused(f"{graph.path} was quantized at export (MatMulNBits, ONNX Runtime CPU); GPU builds "
                           "make their graph from a plain export", "re-export without --quant (and with --dtype fp32)")
    if precision == graph.dtype:
        return None
    if graph.dtype != "fp32":
        raise BuildRefused(f"--precision {precision} is made from an fp32 export; {graph.path} is {graph.dtype}",
                           f"re-export with --dtype fp32, or build --precision {graph.dtype}")
    if precision in HALF:
        return GraphRecipe(precision, precision)
    if precision == "fp8":
        if asked.method not in (None, "rtn"):
            raise ConfigError(f"--quant-method {asked.method} does not apply to fp8 (scales are calibrated maxima)",
                              "drop --quant-method for --precision fp8")
        calibration = _calibration(asked, "--precision fp8 needs calibration text for its activation scales")
        return GraphRecipe("fp8", "fp16", "fp8", lm_head=bool(asked.lm_head), calibration=calibration)
    if precision == "int8" and getattr(runtime, "int8_form", "weight_only") == "w8a8":
        return _w8a8_recipe(asked)
    method = asked.method or "rtn"
    if method not in GPU_METHODS:
        raise ConfigError(f"--quant-method {method!r} is not one of {', '.join(GPU_METHODS)} for GPU --precision {precision}",
                          f"use one of: {', '.join(GPU_METHODS)} (gptq is the ONNX Runtime CPU path's)")
    calibration = _calibration(asked, "--quant-method awq needs calibration text") if method == "awq" else None
    block = asked.block_size or profile.defaults.get("quant_block_size", GPU_BLOCK_SIZE)
    if block < 16 or block & (block - 1):
        raise ConfigError(f"--block-size {block} must be a power of two >= 16", "e.g. --block-size 128 (TensorRT's default)")
    return GraphRecipe(precision, "fp16", precision, method=method, block_size=block,
                       lm_head=asked.lm_head is not False, embeddings=bool(asked.embeddings), calibration=calibration)


def _w8a8_recipe(asked: QuantOptions) -> Any:
    """INT8 weights (per output channel) and activations (per tensor), SmoothQuant-balanced."""
    from edgekit.engines.gpu_graph import GraphRecipe

    if asked.method not in (None, "smoothquant"):
        raise ConfigError(f"--quant-method {asked.method} does not apply to TensorRT int8 (SmoothQuant W8A8 Q/DQ)",
                          "drop --quant-method, or use --runtime ort-cuda for int8 weight-only")
    calibration = _calibration(asked, "TensorRT int8 (W8A8) needs calibration text for its activation scales")
    return GraphRecipe("int8", "fp16", "int8", method="smoothquant", lm_head=bool(asked.lm_head), calibration=calibration)


def _calibration(asked: QuantOptions, why: str) -> str:
    if asked.calibration is None:
        raise BuildRefused(why, "pass --calibration TEXTFILE (text like the model's use, e.g. held-out source code)")
    return str(asked.calibration)


def _quant_layout(quantize: QuantSettings) -> dict[str, Any] | None:
    """The ORT CPU quantizers' layout, for sizing: bits, block, and what they leave in fp32."""
    if quantize.quantization == "none":
        return None
    return {"bits": 4 if quantize.quantization == "int4" else 8, "block_size": quantize.block_size or 32,
            "lm_head": bool(quantize.lm_head), "embeddings": bool(quantize.embeddings)}


def memory_estimate(graph: ExportedGraph, profile: Profile, precision: str, quantization: str = "none",
                    kv_copies: int = 1, recipe: Any = None, quant: dict[str, Any] | None = None,
                    refuse: bool = True) -> dict[str, Any]:
    """Weights + KV cache at the profile's max context and batch, against its memory; refuses over budget.

    Weights are the bytes the runtime holds, from the graph's initializer shapes: ``recipe`` (a GPU
    graph: half precision, quantized weights with their scales) or ``quant`` (ORT CPU quantizers),
    else the export as stored. ``kv_copies``: cache buffers per tensor (2 where the runtime
    ping-pongs past and present). The refusal names a precision of the profile that would fit.
    """
    from edgekit.engines.gpu_graph import planned_weight_bytes

    if recipe is not None or quant is not None:
        weights = planned_weight_bytes(graph.model_path, recipe, quant)
    else:
        stored = model_bytes(graph.model_path)
        weights = int(stored * BYTES[precision] / BYTES[graph.dtype]) if precision in HALF else stored
    kv = _kv_bytes(graph, profile, "fp32" if precision == "fp32" else "fp16", kv_copies)
    context, batch = profile.shapes["context"].max, profile.shapes["batch"].max
    budget = int(profile.hardware["memory_gb"] * 1e9 * MEMORY_SHARE[profile.device])
    estimate = {"weights_bytes": weights, "kv_cache_bytes": kv, "total_bytes": weights + kv,
                "budget_bytes": budget, "context": context, "batch": batch}
    if weights + kv > budget and refuse:
        fits = _fitting_precision(graph, profile, precision, kv_copies, budget)
        raise BuildRefused(
            f"{precision} weights {weights / 1e9:.2f} GB + KV cache at {context} tokens x batch {batch} {kv / 1e9:.2f} GB "
            f"exceed {MEMORY_SHARE[profile.device]:.0%} of {profile.name}'s {profile.hardware['memory_gb']:g} GB "
            f"({budget / 1e9:.2f} GB)" + (f"; {fits[0]} would fit ({fits[1] / 1e9:.2f} GB)" if fits else ""),
            (f"build {fits[2]}, or " if fits else "")
            + "lower [shapes].context in a profile of your own (--profile board.toml), or pick a bigger profile",
        )
    return estimate


def _kv_bytes(graph: ExportedGraph, profile: Profile, kv_dtype: str, kv_copies: int) -> int:
    context, batch = profile.shapes["context"].max, profile.shapes["batch"].max
    per_token = sum(2 * layer.num_kv_heads * layer.head_dim for layer in graph.layers if layer.has_kv) * BYTES[kv_dtype]
    # Linear-attention layers hold fixed-size states (the recurrent one in fp32) whatever the context.
    fixed = sum(math.prod(shape) * (4 if part == "recurrent" else BYTES[kv_dtype])
                for layer in graph.layers if not layer.has_kv for part, shape in layer.states.items())
    return (per_token * context + fixed) * batch * kv_copies


def _fitting_precision(graph: ExportedGraph, profile: Profile, precision: str, kv_copies: int,
                       budget: int) -> tuple[str, int, str] | None:
    """(precision, total bytes, the option to pass) of the most accurate alternative that fits."""
    if graph.dtype != "fp32" or graph.quantization:
        return None
    for other in FIT_ORDER:
        if other == precision or other not in profile.hardware["precisions"]:
            continue
        if profile.is_gpu:
            from edgekit.engines.gpu_graph import GraphRecipe

            recipe = GraphRecipe(other, "fp16" if other not in HALF else other, other if other in QUANTIZED else None,
                                 method="rtn" if other in ("int4", "int8") else None,
                                 block_size=profile.defaults.get("quant_block_size", GPU_BLOCK_SIZE), lm_head=other != "fp8")
            option, quant = f"--precision {other}", None
        elif other in ("int4", "int8"):
            recipe, option = None, f"--quant {other}"
            quant = {"bits": 4 if other == "int4" else 8, "block_size": profile.defaults.get("quant_block_size", 32),
                     "lm_head": True, "embeddings": other == "int4"}
        else:
            continue
        estimate = memory_estimate(graph, profile, other, kv_copies=kv_copies, recipe=recipe, quant=quant, refuse=False)
        if estimate["total_bytes"] <= budget:
            return other, estimate["total_bytes"], option
    return None


def _requirements(profile: Profile, runtime: Any) -> dict[str, Any]:
    req: dict[str, Any] = {"device": profile.device}
    if profile.is_gpu:
        req["compute_capability"] = profile.hardware["compute_capability"]
    else:
        req["cpu_flags"] = list(profile.hardware["cpu_flags"])
    return {**req, **runtime.requirements(profile)}
