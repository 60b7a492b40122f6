"""Lower the traced ``ai.edgekit`` graph to one target's ops."""

from __future__ import annotations

from typing import Any

from edgekit.errors import InternalError
from edgekit.export.ops import DOMAIN, OPS, LoweringContext

TARGET_OPSETS = {"ort": {"": 23, "com.microsoft": 1}, "portable": {"": 23}, "decomposed": {"": 23}}


def lower(model: Any, target: str) -> list[str]:
    """Rewrite every ai.edgekit node in ``model`` (an onnx_ir Model) for ``target``.

    Returns the non-standard ops the lowered graph uses, e.g. ``com.microsoft.GroupQueryAttention``.
    """
    import onnx_ir as ir

    graph = model.graph
    ctx = LoweringContext(graph, target)
    for node in [n for n in graph if n.domain == DOMAIN]:
        op = OPS.get(node.op_type)
        if op is None or target not in op.lowerings:
            raise InternalError(f"no {target} lowering for {DOMAIN}.{node.op_type}")
        start = len(ctx.tape.nodes)
        ctx.prefix = f"/model/{node.name}"
        outputs = op.lowerings[target](ctx, node)
        new_nodes = ctx.tape.nodes[start:]
        ir.convenience.replace_nodes_and_values(graph, node, [node], new_nodes, node.outputs, outputs)
    graph.opset_imports.pop(DOMAIN, None)
    for domain, version in TARGET_OPSETS[target].items():
        graph.opset_imports[domain] = version
    graph.sort()
    return sorted({f"{n.domain}.{n.op_type}" for n in graph if n.domain not in ("", "ai.onnx")})
