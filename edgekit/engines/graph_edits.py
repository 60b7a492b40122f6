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

    MTP head        (export --mtp) its LM head keeps the same rows, and the token its row t pairs
                    with becomes the next input token where row t has no logits (a prompt's rows
                    but the last): exactly the pair the head was trained on.

        tokens (B, S) = Concat(input_ids[:, 1 : 1 + S - K], ArgMax(logits) (B, K))

Packing the q/k/v and gate/up MatMuls into one each (+ Split) was tried and removed: no
measurable change in decode or prefill, fp32 or int4 (benchmarks/NOTES.md).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from edgekit.types import MTP_LOGITS

KEEP_INPUT = "logits_to_keep"
MS_DOMAIN = "com.microsoft"


def edit_build(proto, untie: bool = True) -> dict[str, object]:
    """Apply the edits to ``proto`` in place; returns what was done, for the sidecar."""
    done: dict[str, object] = {}
    head = lm_head(proto)
    if head is None:
        return done
    mtp = lm_head(proto, MTP_LOGITS)
    if untie:
        shared = mtp is not None and mtp.input[1] == head.input[1]  # not with --mtp-vocab: its own rows
        done["tied_lm_head"] = _read_tied_embedding(proto, [head, *([mtp] if shared else [])])
    done["logits_to_keep"] = _keep_last(proto, head)
    if mtp is not None and done["logits_to_keep"]:
        done["mtp_rows_kept"] = _keep_mtp_rows(proto, lm_head(proto, MTP_LOGITS))
    return done


ELEMENTWISE = ("Cast", "Reshape", "Identity", "Mul", "Div", "Tanh")  # between the head and logits (softcap)


def lm_head(proto, output: str = "logits"):
    """The (Fused)MatMul node whose output reaches ``output`` through per-position ops only, or None."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer.get(output)
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


def _read_tied_embedding(proto, heads: list) -> bool:
    """Point the LM heads (the model's, an MTP head's) at the embedding table (transB) when their
    weight holds the same numbers and nothing else reads it."""
    from onnx import helper

    from edgekit.quantize.tied import is_transpose

    head = heads[0]
    if any(h.op_type != "MatMul" for h in heads):
        return False
    inits, users = _initializers(proto), _consumers(proto)
    weight = inits.get(head.input[1])
    if weight is None or len(weight.dims) != 2 or len(users[weight.name]) != len(heads):
        return False
    rows, cols = weight.dims  # (H, vocab)
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits
               and list(inits[n.input[0]].dims) == [cols, rows]]
    if not gathers:
        return False
    table = inits[gathers[0].input[0]]
    if not is_transpose(table, weight):
        return False
    for old in heads:
        _replace(proto, old, [helper.make_node("FusedMatMul", [old.input[0], table.name], list(old.output),
                                               name=old.name, domain=MS_DOMAIN, transA=0, transB=1, alpha=1.0)])
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


def _keep_mtp_rows(proto, head) -> bool:
    """With ``logits_to_keep``: the MTP head's LM head keeps the same last K rows, and the tokens its
    rows pair with are the next input tokens where the target computed no logits, then ArgMax's K."""
    from onnx import helper, numpy_helper

    argmax = next((n for n in proto.graph.node if n.op_type == "ArgMax" and n.input[0] == "logits"), None)
    if argmax is None:  # the head would pair K tokens with S rows: the first prompt would fail in ORT
        from edgekit.errors import ArtifactError

        raise ArtifactError("the graph has an MTP head but no ArgMax of its logits to pair its rows with",
                            "re-export with edgekit export MODEL -o DIR --mtp")
    picked, p = argmax.output[0], "/edgekit/mtp_keep/"
    users = [n for n in proto.graph.node if picked in n.input]
    proto.graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), p + "one"))
    nodes = [
        helper.make_node("Shape", ["input_ids"], [p + "ids_shape"], name=p + "ShapeIds", start=1, end=2),  # [S]
        helper.make_node("Shape", [picked], [p + "kept"], name=p + "ShapeKept", start=1, end=2),  # [K]
        helper.make_node("Sub", [p + "ids_shape", p + "kept"], [p + "given"], name=p + "Sub"),  # [S - K]
        helper.make_node("Add", [p + "given", p + "one"], [p + "end"], name=p + "Add"),
        helper.make_node("Slice", ["input_ids", p + "one", p + "end", p + "one"], [p + "next_ids"], name=p + "Slice"),
        helper.make_node("Concat", [p + "next_ids", picked], [p + "tokens"], name=p + "Concat", axis=1),  # (B, S)
    ]
    index = list(proto.graph.node).index(argmax) + 1
    for offset, new in enumerate(nodes):
        proto.graph.node.insert(index + offset, new)
    for user in users:
        user.input[:] = [p + "tokens" if name == picked else name for name in user.input]
    # the head's LM head: the same rows as the model's
    sliced = p + "hidden"
    proto.graph.node.insert(list(proto.graph.node).index(head), helper.make_node(
        "Slice", [head.input[0], "/edgekit/keep/start", "/edgekit/keep/end", "/edgekit/keep/axis"], [sliced],
        name=p + "SliceHidden"))
    head.input[0] = sliced
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
