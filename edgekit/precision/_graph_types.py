"""Element types of an ONNX graph's values, and the tensor conversions the half pass needs.

onnx's shape inference stops at com.microsoft ops, and values made by edgekit's lowerings carry no
value_info, so :func:`element_types` propagates types by a few rules instead (element types only:
all the fp16 / bf16 pass needs).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import InternalError

FLOAT, FLOAT16, BFLOAT16 = 1, 10, 16  # onnx.TensorProto element types
# Outputs typed fp32 by the op's schema whatever the input type (mean / inv_std_var).
FIXED_FLOAT_OUTPUTS = {"SimplifiedLayerNormalization": (1, 2), "SkipSimplifiedLayerNormalization": (1, 2),
                       "LayerNormalization": (1, 2), "SkipLayerNormalization": (1, 2)}
TYPE_BLIND = {"Shape", "Size"}  # read only the shape of their input
COMPARE = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Not", "Xor", "IsNaN", "IsInf"}


def element_types(graph: Any, outer: dict[str, int] | None = None) -> dict[str, int]:
    """Element type of every value of ``graph`` (top level): the declared ones, the rest propagated.

    onnx's shape inference stops at com.microsoft ops and lowering-made values carry no
    value_info, so types are propagated here by a few rules (all this pass needs). ``outer``: the
    enclosing graph's types, for a Loop body.
    """
    types: dict[str, int] = dict(outer or {})
    for v in [*graph.input, *graph.output, *graph.value_info]:
        if v.type.tensor_type.elem_type:
            types[v.name] = v.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        for i, out in enumerate(node.output):
            if out and out not in types:
                types[out] = _output_type(node, i, types)
    return types


def _output_type(node: Any, index: int, types: dict[str, int]) -> int:
    op, attrs = node.op_type, {a.name: a for a in node.attribute}
    if op == "Cast":
        return attrs["to"].i
    if op in TYPE_BLIND:
        return 7  # INT64
    if op in COMPARE:
        return 9  # BOOL
    if op == "Constant":
        return attrs["value"].t.data_type if "value" in attrs else FLOAT
    if op == "ConstantOfShape":
        return attrs["value"].t.data_type if "value" in attrs else FLOAT
    if index in FIXED_FLOAT_OUTPUTS.get(op, ()):
        return FLOAT
    if op in ("DequantizeLinear", "QuantizeLinear") and "output_dtype" in attrs and attrs["output_dtype"].i:
        return attrs["output_dtype"].i
    if op == "DequantizeLinear":
        return types.get(node.input[1], FLOAT)
    if op == "QuantizeLinear":
        return types.get(node.input[2], 2) if len(node.input) > 2 and node.input[2] else 2  # UINT8
    if op == "GatherBlockQuantized":
        return types.get(node.input[2], FLOAT)
    if op == "Where":
        return types.get(node.input[1], FLOAT)
    if op in ("ArgMax", "ArgMin", "NonZero") or (op == "TopK" and index == 1):
        return 7  # INT64
    if op == "Loop":  # carried values keep their input's type; scan outputs: the body's
        carried = len(node.input) - 2
        if index < carried:
            return types.get(node.input[2 + index], FLOAT)
        body = next(a.g for a in node.attribute if a.name == "body")
        return body.output[1 + index].type.tensor_type.elem_type or _scan_type(body, 1 + index, types)
    known = [types[i] for i in node.input if i and i in types]
    return known[0] if known else FLOAT


def _scan_type(body: Any, k: int, outer: dict[str, int]) -> int:
    """A body output's type from the body's own propagation (bodies carry few declarations)."""
    inner = element_types(body, outer)
    return inner.get(body.output[k].name, FLOAT)


def subgraphs(node: Any) -> list[Any]:
    return [a.g for a in node.attribute if a.type == a.GRAPH] + [g for a in node.attribute for g in a.graphs]


def free_names(body: Any) -> set[str]:
    """Names a (nested) body reads but does not define: values of an enclosing graph."""
    defined = {v.name for v in body.input} | {i.name for i in body.initializer}
    used: set[str] = set()
    for node in body.node:
        used |= {n for n in node.input if n and n not in defined}
        for sub in subgraphs(node):
            used |= free_names(sub) - defined
        defined |= set(node.output)
    return used - defined


def rename_inputs(body: Any, renames: dict[str, str]) -> None:
    if not renames:
        return
    for node in body.node:
        node.input[:] = [renames.get(n, n) for n in node.input]
        for sub in subgraphs(node):
            rename_inputs(sub, renames)


def to_array(tensor: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor)


def fp32_source(tensor: Any, stored: int) -> np.ndarray:
    """The fp32 values of a source already converted to ``stored`` (exact: half values are fp32 values)."""
    return to_array(tensor).astype(np.float32) if stored != FLOAT else to_array(tensor)


def from_array(array: np.ndarray, to: int, name: str = "") -> Any:
    """A TensorProto of ``array`` in type ``to``: round to nearest even, clamped to the finite range
    (float32's lowest, used as a mask value, would otherwise become -inf)."""
    import ml_dtypes
    from onnx import numpy_helper

    target = {FLOAT: np.float32, FLOAT16: np.float16, BFLOAT16: ml_dtypes.bfloat16}[to]
    array = np.asarray(array)
    if to != FLOAT:
        limit = float(np.finfo(np.float16).max) if to == FLOAT16 else float(ml_dtypes.finfo(ml_dtypes.bfloat16).max)
        array = np.clip(array.astype(np.float32), -limit, limit)
    return numpy_helper.from_array(array.astype(target), name)


def check_weights_loaded(graph: Any) -> None:
    missing = [i.name for i in graph.initializer if i.data_location == 1 and not i.raw_data]
    if missing:
        raise InternalError(f"convert_to_half needs the weights in memory; {missing[0]} is external "
                            "(load the model with onnx.load(path), which reads external data)")


def initializer_bytes(graph: Any) -> int:
    total = 0
    for init in graph.initializer:
        total += len(init.raw_data) if init.raw_data else to_array(init).nbytes
    return total
