"""Edits of an ONNX Runtime CPU build's graph, after ORT's own optimization (measured in
``benchmarks/NOTES.md``).

    logits_to_keep  the LM head reads only the last K positions: prefill computes one row of
                    logits instead of S (a 1024 x 151936 product per prompt token saved).
                    0 = every position, what validate and perplexity need and what
                    edgekit's sessions feed unless they want the last row only.

        hidden (B, S, H) ─Slice(axis 1, start -K)→ (B, K or S, H) ─LM head→ logits

    tied head       ORT's constant folding turns Transpose(embedding) into a second
                    (H, vocab) initializer: 622 MB more on disk for a 0.6B model. FusedMatMul
                    (transB=1) reads the embedding table itself (fp32 builds only: int4 quantizes
                    the folded copy).

Packing the q/k/v and gate/up MatMuls into one each (+ Split) was tried and removed: no
measurable change in decode or prefill, fp32 or int4 (benchmarks/NOTES.md).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

KEEP_INPUT = "logits_to_keep"
MS_DOMAIN = "com.microsoft"


def edit_build(proto, untie: bool = True) -> dict[str, object]:
    """Apply the edits to ``proto`` in place; returns what was done, for the sidecar."""
    done: dict[str, object] = {}
    head = lm_head(proto)
    if head is None:
        return done
    if untie:
        done["tied_lm_head"] = _read_tied_embedding(proto, head)
    done["logits_to_keep"] = _keep_last(proto, head)
    return done


ELEMENTWISE = ("Cast", "Reshape", "Identity", "Mul", "Div", "Tanh")  # between the head and logits (softcap)


def lm_head(proto):
    """The (Fused)MatMul node whose output reaches ``logits`` through per-position ops only, or None."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer.get("logits")
    for _ in range(6):
        if node is None or node.op_type not in ELEMENTWISE:
            break
        # follow the computed operand (a softcap's Mul may take its constant first)
        node = next((producer[i] for i in node.input if i in producer and producer[i].op_type != "Constant"), None)
    # ORT's MatMulScaleFusion may have folded a softcap's division into a FusedMatMul (alpha)
    return node if node is not None and node.op_type in ("MatMul", "FusedMatMul") else None


def _initializers(proto) -> dict[str, object]:
    return {t.name: t for t in proto.graph.initializer}


def _consumers(proto) -> dict[str, list]:
    users = defaultdict(list)
    for node in proto.graph.node:
        for name in node.input:
            users[name].append(node)
    return users


def _read_tied_embedding(proto, head) -> bool:
    """Point the LM head at the embedding table (transB) when it holds the same numbers."""
    from onnx import helper

    from edgekit.quantize.tied import is_transpose

    if head.op_type != "MatMul":
        return False
    inits, users = _initializers(proto), _consumers(proto)
    weight = inits.get(head.input[1])
    if weight is None or len(weight.dims) != 2 or len(users[weight.name]) != 1:
        return False
    rows, cols = weight.dims  # (H, vocab)
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and list(inits[n.input[0]].dims) == [cols, rows]]
    if not gathers:
        return False
    table = inits[gathers[0].input[0]]
    if not is_transpose(table, weight):
        return False
    fused = helper.make_node("FusedMatMul", [head.input[0], table.name], list(head.output), name=head.name,
                             domain=MS_DOMAIN, transA=0, transB=1, alpha=1.0)
    _replace(proto, head, [fused])
    proto.graph.initializer.remove(weight)
    _ensure_domain(proto)
    return True


def _keep_last(proto, head) -> bool:
    """Slice the LM head's input to its last ``logits_to_keep`` positions (0: all)."""
    from onnx import TensorProto, helper, numpy_helper

    if any(i.name == KEEP_INPUT for i in proto.graph.input):
        return False
    node = next(n for n in proto.graph.node if n.name == head.name)  # the head may have been replaced
    hidden = node.input[0]
    # A required input: ORT's IO binding cannot bind an initializer-backed (defaulted) input.
    # edgekit's OrtSession feeds 0 unless asked for the last position only.
    proto.graph.input.append(helper.make_tensor_value_info(KEEP_INPUT, TensorProto.INT64, [1]))
    proto.graph.initializer.extend([
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), "/edgekit/keep/end"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "/edgekit/keep/axis"),
    ])
    start, kept = "/edgekit/keep/start", "/edgekit/keep/hidden"
    nodes = [helper.make_node("Neg", [KEEP_INPUT], [start], name="/edgekit/keep/Neg"),
             # (B, S, H) -> (B, K, H); start -0 = 0 keeps all S
             helper.make_node("Slice", [hidden, start, "/edgekit/keep/end", "/edgekit/keep/axis"], [kept],
                              name="/edgekit/keep/Slice")]
    index = list(proto.graph.node).index(node)
    for offset, new in enumerate(nodes):
        proto.graph.node.insert(index + offset, new)
    node.input[0] = kept
    return True


def _replace(proto, old, new: list) -> None:
    index = list(proto.graph.node).index(old)
    proto.graph.node.remove(old)
    for offset, node in enumerate(new):
        proto.graph.node.insert(index + offset, node)


def _ensure_domain(proto) -> None:
    from onnx import helper

    if not any(o.domain == MS_DOMAIN for o in proto.opset_import):
        proto.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
