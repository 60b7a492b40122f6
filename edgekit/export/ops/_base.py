"""Shared machinery for edgekit's custom ops.

Each op module defines, in one place: a torch.library custom op (the eager kernel is
the reference implementation), its fake kernel for tracing, an ONNX schema in the
``ai.edgekit`` domain that tracing emits, and one lowering per target that rewrites
that node into ops a runtime executes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DOMAIN = "ai.edgekit"
FLOAT = 1  # onnx TensorProto.FLOAT: the dtype of statistics, softmax and recurrent states

# Lowering signature: (ctx, node) -> replacement outputs, in the node's output order.
Lowering = Callable[["LoweringContext", Any], list[Any]]


@dataclass
class OpDef:
    """One edgekit op: its ONNX-side name, inputs/outputs and lowerings per target."""

    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attributes: dict[str, str]  # attribute name -> "int" | "float"
    lowerings: dict[str, Lowering] = field(default_factory=dict)


OPS: dict[str, OpDef] = {}


def register_op(op: OpDef) -> OpDef:
    """Register an op's ONNX schema (so onnxscript can emit it) and its lowerings."""
    from onnx import defs

    OPS[op.name] = op
    if defs.has(op.name, DOMAIN):
        return op
    kinds = {"int": defs.OpSchema.AttrType.INT, "float": defs.OpSchema.AttrType.FLOAT}
    schema = defs.OpSchema(
        op.name,
        DOMAIN,
        1,
        inputs=[defs.OpSchema.FormalParameter(n, "T") for n in op.inputs],
        outputs=[defs.OpSchema.FormalParameter(n, "T") for n in op.outputs],
        type_constraints=[("T", [f"tensor({t})" for t in ("float", "float16", "bfloat16", "int32", "int64")], "")],
        attributes=[defs.OpSchema.Attribute(a, kinds[k], "") for a, k in op.attributes.items()],
    )
    defs.register_schema(schema)
    return op


def emit(op_name: str, *inputs: Any, **attributes: Any) -> Any:
    """Emit an ``ai.edgekit`` node from inside a torch.onnx translation function."""
    import onnxscript

    opset = onnxscript.values.Opset(DOMAIN, 1)
    return getattr(opset, op_name)(*inputs, **attributes)


class LoweringContext:
    """State shared by the lowerings of one graph: a tape to build nodes and a cache
    of values computed once per graph (sequence lengths, positions, masks)."""

    def __init__(self, graph: Any, target: str):
        from onnx_ir import tape

        self.graph = graph
        self.target = target
        self.tape = tape.Tape()
        self.shared: dict[Any, Any] = {}
        self.prefix = ""

    def op(self, op_type: str, inputs: list[Any], attrs: dict[str, Any] | None = None, **kw: Any) -> Any:
        """Add one node with a namespaced name; returns its (first) output."""
        name = f"{self.prefix}/{op_type}_{len(self.tape.nodes)}"
        value = self.tape.op(op_type, inputs, attrs, name=name, **kw)
        value.name = value.name or f"{name}/output_0"  # explicit names keep Loop bodies and outer graph apart
        return value

    def multi(self, op_type: str, inputs: list[Any], attrs: dict[str, Any], n: int, **kw: Any) -> list[Any]:
        """Add one node with ``n`` outputs."""
        name = f"{self.prefix}/{op_type}_{len(self.tape.nodes)}"
        values = list(self.tape.op_multi_out(op_type, inputs, attrs, num_outputs=n, name=name, **kw))
        for i, value in enumerate(values):
            value.name = value.name or f"{name}/output_{i}"
        return values

    def const(self, value: Any, dtype: str = "int64") -> Any:
        """A Constant node (cached per value and dtype)."""
        import numpy as np
        import onnx_ir as ir

        key = ("const", dtype, repr(value))
        if key not in self.shared:
            array = np.asarray(value, dtype=dtype)
            self.shared[key] = self.op("Constant", [], {"value": ir.tensor(array)})
        return self.shared[key]

    def cast(self, x: Any, src: Any, dst: Any) -> Any:
        """Cast x from ``src`` to ``dst`` (onnx_ir DataTypes or their ints); no node when they agree."""
        return x if int(src) == int(dst) else self.op("Cast", [x], {"to": int(dst)})

    def subgraph(self, name: str, inputs: list[Any], build: Callable[[], list[Any]]) -> Any:
        """An ir.Graph (a Loop/If body) built by ``build`` on a fresh tape; it may read outer values."""
        import onnx_ir as ir
        from onnx_ir import tape

        saved, self.tape = self.tape, tape.Tape()
        try:
            outputs = build()
            return ir.Graph(inputs, outputs, nodes=self.tape.nodes, name=name)
        finally:
            self.tape = saved

    def once(self, key: Any, build: Callable[[], Any]) -> Any:
        """Compute a value once per graph (e.g. seqlens from the attention mask)."""
        if key not in self.shared:
            saved, self.prefix = self.prefix, "/model/shared"
            self.shared[key] = build()
            self.prefix = saved
        return self.shared[key]
