"""An MTP head (``export --mtp``) in a quantized build: its LM head and embedding lookup read the model's
own tables, and quantize with them, once.

    before   lm_head.T ──MatMul──▶ logits          lm_head.T ──MatMul (head)──▶ mtp_logits
             table ──Gather(input_ids)              table ──Gather(ArgMax)
    after    the model's nodes quantized as ever; the head's become copies of them reading the same
             quantized initializers (its own activations / indices in), so no table is stored twice
             and no quantizer sees one weight under two nodes (ORT's names its outputs after the
             weight: two nodes, two sets of initializers with one name)

The head's twins are left out of quantization (``twins``) and rewired after it (``share_quantized``).
An ``--mtp-vocab`` head reads its own narrower table: it has no twin and quantizes as any MatMul.
"""

from __future__ import annotations

from typing import Any

from edgekit.types import MTP_LOGITS


def twins(proto: Any) -> dict[str, str]:
    """{head node's output: the model node's output} for the head's MatMul / Gather that read the same
    initializer as the model's LM head / embedding lookup; empty without a head."""
    from edgekit.quantize import _lm_head

    by_name = {node.name: node for node in proto.graph.node}
    found: dict[str, str] = {}
    model, head = by_name.get(_lm_head(proto) or ""), by_name.get(_lm_head(proto, MTP_LOGITS) or "")
    if model is not None and head is not None and head.input[1] == model.input[1]:
        found[head.output[0]] = model.output[0]
    inits = {t.name for t in proto.graph.initializer}
    gathers = [n for n in proto.graph.node if n.op_type == "Gather" and n.input[0] in inits]
    lookup = next((n for n in gathers if n.input[1] == "input_ids"), None)
    for node in gathers:
        if lookup is not None and node is not lookup and node.input[0] == lookup.input[0]:
            found[node.output[0]] = lookup.output[0]
    return found


def excluded(proto: Any, pairs: dict[str, str]) -> list[str]:
    """Names of the head's twin nodes, for the quantizers' exclusion lists."""
    return [n.name for n in proto.graph.node if n.output and n.output[0] in pairs]


QUANTIZED = ("MatMulNBits", "GatherBlockQuantized")


def share_quantized(proto: Any, pairs: dict[str, str]) -> int:
    """Make each head twin a copy of its (now quantized) model node, reading the same initializers;
    drop the float tables nothing reads any more. Returns the nodes rewired."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    done = 0
    for head_out, model_out in pairs.items():
        head, chain = producer[head_out], [producer[model_out]]
        # a shared tied table reshapes around its GatherBlockQuantized (edgekit.quantize.tied)
        while chain[0].op_type == "Reshape" and len(chain) < 3:
            chain.insert(0, producer[chain[0].input[0]])
        if chain[0].op_type not in QUANTIZED:  # the model's stayed as it was (e.g. --no-quant-lm-head)
            continue
        own = head.input[1] if head.op_type == "Gather" else head.input[0]  # its indices / activations
        index = list(proto.graph.node).index(head)
        proto.graph.node.remove(head)
        for offset, node in enumerate(_copies(chain, own, head_out, head.name)):
            proto.graph.node.insert(index + offset, node)
        done += 1
    used = {name for node in proto.graph.node for name in node.input}
    used |= {v.name for v in (*proto.graph.input, *proto.graph.output)}
    for stale in [t for t in proto.graph.initializer if t.name not in used]:
        proto.graph.initializer.remove(stale)
    return done


def _copies(chain: list, own: str, output: str, name: str) -> list:
    """``chain`` (a quantized node, then reshapes) again, on ``own`` activations or indices, ending in ``output``."""
    from onnx import helper

    copies, previous = [], None
    for i, node in enumerate(chain):
        inputs = list(node.input)
        if i == 0:
            inputs[1 if node.op_type == "GatherBlockQuantized" else 0] = own
        else:
            inputs[0] = previous
        previous = output if i == len(chain) - 1 else f"{name}/{i}"
        copy = helper.make_node(node.op_type, inputs, [previous], name=f"{name}/{node.op_type}{i}", domain=node.domain)
        copy.attribute.extend(node.attribute)
        copies.append(copy)
    return copies
