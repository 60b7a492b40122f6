"""The ONNX file a GPU build hands its runtime: the export's fp32 graph with its precision in it.

TensorRT 11 has no precision builder flags (strongly typed networks only), so an engine's
precision is the graph's: this module runs the passes of :mod:`edgekit.precision` in their order,
checks the result, and saves it into the build folder, where TensorRT parses it, ONNX Runtime
(CUDA, TensorRT EP) loads it, and a weight-stripped plan refits from it.

    export model.onnx (fp32)
      ─[awq | fp8] calibration_windows + matmul_input_stats (fp32)→ stats
      ─[int4 | int8] quantize_weight_only    weight(INT4|INT8) → DequantizeLinear(block, no zero point) → MatMul
       [fp8]         quantize_fp8            e4m3 Q/DQ on weights and activations
      ─convert_to_half(fp16 | bf16)          activations, scales and the rest; fp32 islands
      ─check (ops for the runtime's floor, Q/DQ structure, no fp32 MatMul weight left)
      ─save→ build folder model.onnx + model.onnx.data, and the figures for the sidecar

``planned_weight_bytes`` sizes the same graph from initializer shapes alone (no weight is read),
for the memory plan. Nothing here imports torch.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError, InternalError, require
from edgekit.types import ExportedGraph, TensorSpec

GRAPH_FILE = "model.onnx"
# ONNX TensorProto element types (onnx.TensorProto), so sizing a plan needs no onnx import.
FLOAT, FLOAT16, BFLOAT16, INT8, FLOAT8E4M3FN, INT4 = 1, 10, 16, 3, 17, 22
FLOAT_TYPES = {FLOAT: 4, FLOAT16: 2, BFLOAT16: 2}
ITEM_BYTES = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8, 16: 2, 17: 1}
DTYPE_NAMES = {FLOAT: "float32", FLOAT16: "float16", BFLOAT16: "bfloat16", 7: "int64", 6: "int32"}
SHORT = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}
WEIGHT_TYPES = {"int4": INT4, "int8": INT8, "fp8": FLOAT8E4M3FN}
# Windows of up to 1,024 tokens (the model's positions where fewer): attention then sees the long
# contexts where half-precision softmax and quantized K/V projections lose most.
GPU_QUALITY_WINDOW = 1024


@dataclass(frozen=True)
class GraphRecipe:
    """How a GPU build's graph is made from an fp32 export (the plan's ``graph``, as data).

    ``precision`` is what the user asked for; ``activations`` the float type everything that is
    not a quantized weight computes in; ``weights`` the quantized weight type, None for half only.
    """

    precision: str  # fp16 | bf16 | int4 | int8 | fp8
    activations: str  # fp16 | bf16
    weights: str | None = None  # int4 | int8 | fp8
    method: str | None = None  # int4 / int8 weight-only: rtn | awq; int8 W8A8: smoothquant (fp8: calibrated max)
    block_size: int | None = None  # int4 / int8: weights per scale along the input axis
    lm_head: bool | None = None  # whether the output projection is quantized too
    embeddings: bool | None = None  # the embedding table (stays half precision on GPU)
    calibration: str | None = None  # text for AWQ / fp8 scales
    model_file: str = GRAPH_FILE

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphRecipe:
        return cls(**data)

    @property
    def needs_stats(self) -> bool:
        """AWQ, SmoothQuant and fp8 scales come from the fp32 model's MatMul inputs on calibration text."""
        return self.weights == "fp8" or self.method in ("awq", "smoothquant")


# ---------------------------------------------------------------- sizing (plan time, no weights read)


def planned_weight_bytes(model: Path, recipe: GraphRecipe | None, quant: dict[str, Any] | None = None) -> int:
    """Bytes of the weights the runtime will hold, from the export's initializer shapes.

    ``recipe``: a GPU graph (half precision; quantized MatMul weights with fp16 scales, no zero
    point). ``quant``: the ORT CPU quantizers instead ({"bits", "block_size", "lm_head",
    "embeddings"}: MatMulNBits keeps an fp32 scale and a 4-bit zero point per block; dynamic int8
    one scale per tensor). Neither: the export as stored. Small float tensors (norm weights,
    rotary tables) count as stored: the half pass keeps those islands in fp32.
    """
    onnx = require("onnx", ("cpu", "gpu"))
    proto = onnx.load(str(model), load_external_data=False)
    roles = _weight_roles(proto)
    return sum(_tensor_bytes(t, roles.get(t.name), recipe, quant) for t in proto.graph.initializer)


def _weight_roles(proto) -> dict[str, str]:
    """{initializer: "matmul" | "head" | "table"} for MatMul weights, the LM head's and Gather tables."""
    from edgekit.engines.graph_edits import lm_head

    names = {t.name for t in proto.graph.initializer}
    roles: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and node.input[1] in names:
            roles[node.input[1]] = "matmul"
        elif node.op_type == "Gather" and node.input[0] in names and node.input[1] == "input_ids":
            roles.setdefault(node.input[0], "table")  # the embedding table (rotary tables are gathered by position)
    head = lm_head(proto)
    if head is not None and len(head.input) > 1 and head.input[1] in names:
        roles[head.input[1]] = "head"
    return roles


def _tensor_bytes(tensor, role: str | None, recipe: GraphRecipe | None, quant: dict[str, Any] | None) -> int:
    count = math.prod(tensor.dims)
    stored = count * ITEM_BYTES.get(tensor.data_type, 1)
    if tensor.data_type not in FLOAT_TYPES or role is None or len(tensor.dims) != 2:
        return stored  # constants, norm weights and rotary tables: kept as they are
    if recipe is not None:
        quantized = recipe.weights and (role == "matmul" or (role == "head" and recipe.lm_head)
                                        or (role == "table" and recipe.embeddings))
        if not quantized:
            return count * 2  # fp16 / bf16
        if recipe.weights == "fp8" or recipe.method == "smoothquant":
            return count + 2 * tensor.dims[1]  # e4m3 / int8 and one fp16 scale per output channel
        bits = 4 if recipe.weights == "int4" else 8
        return _blocked(tensor.dims, bits, recipe.block_size or tensor.dims[0], scale=2, zero_point=0)
    if quant is not None:
        quantized = role == "matmul" or (role == "head" and quant["lm_head"]) or (role == "table" and quant["embeddings"])
        if quantized and quant["bits"] == 4:
            return _blocked(tensor.dims, 4, quant["block_size"], scale=4, zero_point=4)
        if quantized and role != "table":
            return count + 4  # dynamic int8: one scale per tensor
    return stored


def _blocked(dims, bits: int, block: int, scale: int, zero_point: int) -> int:
    """Blocks of ``block`` weights along axis 0 (a MatMul weight's input axis), each with a scale."""
    rows, cols = dims
    blocks = math.ceil(rows / block) * cols
    return math.ceil(rows * cols * bits / 8) + blocks * scale + math.ceil(blocks * zero_point / 8)


# ---------------------------------------------------------------- producing the graph (build time)


def make_graph(graph: ExportedGraph, recipe: GraphRecipe, out: Path, runtime: str, floor: str | None,
               progress=None) -> dict[str, Any]:
    """Write the GPU graph for ``recipe`` into ``out`` and check it; returns the sidecar's ``graph``.

    ``floor``: the oldest TensorRT the profile targets (its parser must take every op), None for
    ONNX Runtime's CUDA provider.
    """
    onnx = require("onnx", ("cpu", "gpu"))
    progress = progress or (lambda what, done, total: None)
    progress(f"making the {recipe.precision} graph", 0, 0)
    proto = onnx.load(str(graph.model_path))
    reports = apply_passes(graph, proto, recipe, progress)
    problems = check_graph(proto, recipe, runtime, floor)
    if problems:
        raise InternalError(f"the {recipe.precision} graph made from {graph.path} fails its check: "
                            + "; ".join(problems[:5]), "report this with the export's edgekit.json")
    save_graph(proto, out / recipe.model_file)
    ops = graph_ops(proto)
    del proto
    if floor is not None:  # TensorRT's parser takes standard ONNX only (the ort target has contrib ops
        onnx.checker.check_model(str(out / recipe.model_file))  # in the default domain); the path: > 2 GB too
    return {**recipe.to_dict(), "reports": reports, "ops": ops}


def apply_passes(graph: ExportedGraph, proto, recipe: GraphRecipe, progress) -> dict[str, Any]:
    """stats (fp32) → weight-only or fp8 → half, in place on ``proto``; each pass's report."""
    reports: dict[str, Any] = {}
    stats = None
    if recipe.needs_stats:
        from edgekit.precision.calibrate import calibration_windows, matmul_input_stats

        progress("calibrating on " + Path(str(recipe.calibration)).name, 0, 0)
        windows = calibration_windows(graph, recipe.calibration)
        stats = matmul_input_stats(proto, graph, windows)
        reports["calibration"] = {"text_file": recipe.calibration, "windows": len(windows)}
    if recipe.method == "smoothquant":
        from edgekit.precision.fp8 import quantize_w8a8

        progress("int8 W8A8 Q/DQ (SmoothQuant)", 0, 0)
        reports["w8a8"] = _as_data(quantize_w8a8(proto, stats, lm_head=bool(recipe.lm_head)))
    elif recipe.weights in ("int4", "int8"):
        from edgekit.precision.weight_only import (
            WeightOnlySettings,
            quantize_weight_only,
        )

        progress(f"{recipe.weights} weight-only ({recipe.method})", 0, 0)
        settings = WeightOnlySettings(bits=4 if recipe.weights == "int4" else 8, block_size=recipe.block_size,
                                      method=recipe.method, lm_head=bool(recipe.lm_head),
                                      embeddings=bool(recipe.embeddings))
        reports["weight_only"] = _as_data(quantize_weight_only(proto, settings, stats=stats))
    elif recipe.weights == "fp8":
        from edgekit.precision.fp8 import quantize_fp8

        progress("fp8 Q/DQ", 0, 0)
        reports["fp8"] = _as_data(quantize_fp8(proto, stats, lm_head=bool(recipe.lm_head)))
    from edgekit.precision.half import convert_to_half

    progress(f"{recipe.activations} graph", 0, 0)
    reports["half"] = _as_data(convert_to_half(proto, recipe.activations))
    return reports


def _as_data(report: Any) -> Any:
    """A pass's report as JSON-able data (a dataclass, an object with ``to_dict``, or plain data)."""
    if hasattr(report, "to_dict"):
        return report.to_dict()
    if dataclasses.is_dataclass(report):
        return dataclasses.asdict(report)
    return report


def save_graph(proto, path: Path) -> None:
    """One model file and one external data file beside it (what TensorRT's parser and refitter read)."""
    onnx = require("onnx", ("cpu", "gpu"))
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)


def graph_ops(proto) -> list[str]:
    """Every op type, "domain.Op" outside the default domain (as ``ExportedGraph.ops``)."""
    return sorted({f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type
                   for n in proto.graph.node})


def check_graph(proto, recipe: GraphRecipe, runtime: str, floor: str | None) -> list[str]:
    """What is wrong with a GPU graph for ``runtime``: ops its parser lacks, Q/DQ structure
    TensorRT would not take, MatMul weights left in fp32. Empty when it is right."""
    inits = {t.name: t for t in proto.graph.initializer}
    problems = _op_problems(proto, runtime, floor)
    producer = {out: node for node in proto.graph.node for out in node.output}
    for node in proto.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        weight = node.input[1]
        if weight in inits and inits[weight].data_type == FLOAT:
            problems.append(f"MatMul {node.name} reads an fp32 weight {weight}")
        source = producer.get(weight)
        if source is not None and source.op_type == "DequantizeLinear":
            problems += _dq_problems(source, inits, recipe)
            if recipe.weights == "fp8" or recipe.method == "smoothquant":
                problems += _activation_problems(node, producer, inits, recipe)
    return problems


def _activation_problems(matmul, producer: dict[str, Any], inits: dict[str, Any], recipe: GraphRecipe) -> list[str]:
    """A quantized MatMul's input as TensorRT takes it: QuantizeLinear → DequantizeLinear, one scale
    per tensor in the activation type, a zero point of the weight's type holding 0."""
    from onnx import numpy_helper

    dq = producer.get(matmul.input[0])
    q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
    if q is None or q.op_type != "QuantizeLinear":
        return [f"MatMul {matmul.name}: its input has no QuantizeLinear → DequantizeLinear pair"]
    problems = []
    for node in (q, dq):
        scale = inits.get(node.input[1])
        zero = inits.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or list(scale.dims) not in ([], [1]):
            problems.append(f"{node.name}: activation scale is not one per tensor")
        elif scale.data_type != {"fp16": FLOAT16, "bf16": BFLOAT16}[recipe.activations]:
            problems.append(f"{node.name}: activation scale is not {recipe.activations}")
        if zero is not None and (zero.data_type != WEIGHT_TYPES[recipe.weights]
                                 or numpy_helper.to_array(zero).astype("float32").any()):
            problems.append(f"{node.name}: zero point is not a {recipe.weights} zero")
    return problems


def _op_problems(proto, runtime: str, floor: str | None) -> list[str]:
    from edgekit.runtimes.tensorrt import TENSORRT_OP_VERSIONS

    ops = graph_ops(proto)
    if floor is None:
        return []
    custom = [op for op in ops if "." in op]
    version = tuple(int(p) for p in floor.split(".")[:2])
    too_new = [op for op, since in TENSORRT_OP_VERSIONS.items() if op in ops and version < since]
    return ([f"{runtime} cannot parse {', '.join(custom)}"] if custom else []) + \
           ([f"{', '.join(too_new)} need TensorRT newer than {floor}"] if too_new else [])


def _dq_problems(node, inits: dict[str, Any], recipe: GraphRecipe) -> list[str]:
    """A weight's DequantizeLinear as TensorRT takes it: a quantized initializer of the planned
    type, a scale in the activation type, no zero point; int4 / int8 blocked along the input axis."""
    from onnx import helper

    problems = []
    weight, scale = inits.get(node.input[0]), inits.get(node.input[1])
    want = WEIGHT_TYPES.get(recipe.weights or "")
    if weight is None or weight.data_type != want:
        problems.append(f"{node.name}: weight is not a {recipe.weights} initializer")
    if scale is None or scale.data_type != {"fp16": FLOAT16, "bf16": BFLOAT16}[recipe.activations]:
        problems.append(f"{node.name}: scale is not {recipe.activations}")
    if len(node.input) > 2 and node.input[2]:
        problems.append(f"{node.name}: has a zero point (TensorRT takes symmetric weights)")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if (recipe.method == "smoothquant" or recipe.weights == "fp8") and (attrs.get("block_size") or attrs.get("axis", 1) != 1):
        problems.append(f"{node.name}: not per output channel (axis 1)")
    elif recipe.weights in ("int4", "int8") and recipe.method != "smoothquant" and (
            attrs.get("block_size") != recipe.block_size or attrs.get("axis", 1) != 0):
        problems.append(f"{node.name}: not blocked by {recipe.block_size} along axis 0")
    return problems


# ---------------------------------------------------------------- the contract of the graph written


def graph_contract(graph: ExportedGraph, proto, path: Path, model_file: str) -> ExportedGraph:
    """``graph``'s contract for the file ``proto`` was saved as: its I/O dtypes, ops and opsets."""
    def spec(value, old: TensorSpec) -> TensorSpec:
        return TensorSpec(old.name, DTYPE_NAMES.get(value.type.tensor_type.elem_type, old.dtype), old.shape)

    def specs(values, olds):
        by_name = {v.name: v for v in values}
        return tuple(spec(by_name[o.name], o) if o.name in by_name else o for o in olds)

    inputs = specs(proto.graph.input, graph.inputs)
    kv = next((t.dtype for t in inputs if t.name.startswith("past_key_values.")), None)
    ops = graph_ops(proto)
    return dataclasses.replace(
        graph, path=path, model_file=model_file, dtype=SHORT.get(kv or "", graph.dtype), inputs=inputs,
        outputs=specs(proto.graph.output, graph.outputs), ops=tuple(ops),
        custom_ops=tuple(op for op in ops if "." in op),
        opset={o.domain: o.version for o in proto.opset_import})


# ---------------------------------------------------------------- quality on CPU (ORT) against fp32


def score_on_cpu(graph: ExportedGraph, built: Path, recipe: GraphRecipe, text: str | Path,
                 progress=None) -> dict[str, Any]:
    """Perplexity / top-1 / KL of the built GPU graph, run by ONNX Runtime's CPU provider through
    ``cpu_runnable``, against the fp32 export on the same provider, over the whole of ``text``."""
    onnx = require("onnx", ("cpu", "gpu"))
    from edgekit.precision.half import cpu_runnable
    from edgekit.quality import score_sessions, text_token_ids
    from edgekit.runtimes.registry import open_engine

    progress = progress or (lambda what, done, total: None)
    ids = text_token_ids(graph, text, None)
    proto = cpu_runnable(onnx.load(str(built / recipe.model_file)), recipe.activations)
    with tempfile.TemporaryDirectory(prefix="edgekit-cpu-graph.") as tmp:
        # An export folder of the CPU-runnable graph: open_engine runs it on ONNX Runtime's CPU provider.
        save_graph(proto, Path(tmp) / GRAPH_FILE)
        contract = graph_contract(graph, proto, Path(tmp), GRAPH_FILE)
        del proto
        if contract.dtype not in ("fp32", "fp16"):
            raise EdgekitError(f"cpu_runnable left a {contract.dtype} cache in the {recipe.precision} graph",
                               "measure quality on the device instead (edgekit validate --quality)")
        contract.save()
        engine = open_engine(Path(tmp))
        try:
            reference = open_engine(graph.path)
            try:
                window = min(GPU_QUALITY_WINDOW, graph.model.max_position_embeddings)
                report = score_sessions(engine, reference, ids, window, str(text), progress).to_dict()
            finally:
                reference.close()
        finally:
            engine.close()
    return {**report, "reference": f"fp32 export {graph.path} on ONNX Runtime CPU",
            "measured_on": f"ONNX Runtime CPU, the {recipe.precision} graph through cpu_runnable"}


def remove_graph(out: Path, recipe: GraphRecipe) -> None:
    """Drop the graph from a build folder whose engine no longer needs it (a full TensorRT plan)."""
    for name in (recipe.model_file, recipe.model_file + ".data"):
        path = out / name
        if path.is_file():
            path.unlink()
