"""Mixture of experts (softmax router, top-k, SwiGLU experts) as one edgekit op.

moe(x (B, S, H), router_logits (B, S, E), gate_up (E, 2I, H), down (E, H, I), top_k, normalize)
    p = softmax(router_logits) in fp32; keep the top k (renormalized when ``normalize``);
    y = sum over kept experts e of p_e * down_e(silu(gate_e x) * up_e x).

Lowerings:
    ort       com.microsoft MoE (SwiGLU, gate/up interleaved as its CPU kernel requires): only the
              selected experts' weights are read per token.
    portable / decomposed   every expert on every token, weighted by the dense routing matrix
              (TopK + ScatterElements): standard ONNX has no gather-by-expert GEMM, so all expert
              weights are read — correct everywhere, fast where experts are few.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekit.export.ops._base import FLOAT, OpDef, emit, register_op


def routing(router_logits: torch.Tensor, top_k: int, normalize: int) -> torch.Tensor:
    """Dense routing weights (..., E): top-k softmax probabilities, zeros elsewhere."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    values, indices = torch.topk(probs, top_k, dim=-1)
    if normalize:
        values = values / values.sum(-1, keepdim=True)
    return torch.zeros_like(probs).scatter(-1, indices, values)


@torch.library.custom_op("edgekit::moe", mutates_args=())
def moe(x: torch.Tensor, router_logits: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
        top_k: int, normalize: int) -> torch.Tensor:
    """Reference kernel: every expert, weighted by the dense routing matrix."""
    weights = routing(router_logits, top_k, normalize).to(x.dtype)  # (B, S, E)
    gate, up = torch.einsum("bsh,eih->ebsi", x, gate_up).chunk(2, dim=-1)  # (E, B, S, I) x2
    out = torch.einsum("ebsi,ehi->ebsh", F.silu(gate) * up, down)  # (E, B, S, H)
    return torch.einsum("ebsh,bse->bsh", out, weights)


@moe.register_fake
def _(x, router_logits, gate_up, down, top_k, normalize):
    return torch.empty_like(x)


def _attrs(node):
    return node.attributes["top_k"].as_int(), node.attributes["normalize"].as_int()


def _lower_ort(ctx, node):
    x, logits, gate_up, down = node.inputs
    top_k, normalize = _attrs(node)
    ctx.prefix = f"/model/{node.name}/moe"
    experts, double, hidden = (gate_up.shape[i] for i in range(3))
    # [gate | up] rows -> gate/up interleaved per row pair: (E, 2, I, H) -> (E, I, 2, H).
    halves = ctx.op("Reshape", [gate_up, ctx.const([experts, 2, double // 2, hidden])])
    interleaved = ctx.op("Reshape", [ctx.op("Transpose", [halves], {"perm": [0, 2, 1, 3]}),
                                     ctx.const([experts, double, hidden])])
    rows = ctx.op("Reshape", [logits, ctx.const([-1, experts])])  # (B*S, E)
    attrs = {"k": top_k, "activation_type": "swiglu", "swiglu_fusion": 1, "normalize_routing_weights": normalize,
             "activation_alpha": 1.0, "activation_beta": 0.0}
    return [ctx.op("MoE", [x, rows, interleaved, None, down], attrs, domain="com.microsoft")]


def _lower_dense(ctx, node):
    x, logits, gate_up, down = node.inputs
    top_k, normalize = _attrs(node)
    ctx.prefix = f"/model/{node.name}/moe"
    dtype = x.dtype
    probs = ctx.op("Softmax", [ctx.cast(logits, dtype, FLOAT)], {"axis": -1})  # (B, S, E)
    values, indices = ctx.multi("TopK", [probs, ctx.const([top_k])], {"axis": -1}, 2)  # (B, S, k)
    if normalize:
        values = ctx.op("Div", [values, ctx.op("ReduceSum", [values, ctx.const([-1])], {"keepdims": 1})])
    weights = ctx.op("ScatterElements", [ctx.op("Mul", [probs, ctx.const(0.0, "float32")]), indices, values],
                     {"axis": -1})  # (B, S, E) fp32
    weights = ctx.op("Transpose", [ctx.cast(weights, FLOAT, dtype)], {"perm": [2, 0, 1]})  # (E, B, S)
    xs = ctx.op("Unsqueeze", [x, ctx.const([0])])  # (1, B, S, H)
    gate_up_t = ctx.op("Unsqueeze", [ctx.op("Transpose", [gate_up], {"perm": [0, 2, 1]}), ctx.const([1])])  # (E, 1, H, 2I)
    gate, up = ctx.multi("Split", [ctx.op("MatMul", [xs, gate_up_t])], {"axis": -1, "num_outputs": 2}, 2)  # (E, B, S, I)
    act = ctx.op("Mul", [ctx.op("Mul", [gate, ctx.op("Sigmoid", [gate])]), up])
    down_t = ctx.op("Unsqueeze", [ctx.op("Transpose", [down], {"perm": [0, 2, 1]}), ctx.const([1])])  # (E, 1, I, H)
    out = ctx.op("MatMul", [act, down_t])  # (E, B, S, H)
    weighted = ctx.op("Mul", [out, ctx.op("Unsqueeze", [weights, ctx.const([3])])])
    return [ctx.op("ReduceSum", [weighted, ctx.const([0])], {"keepdims": 0})]  # (B, S, H)


MOE = register_op(OpDef(
    "MixtureOfExperts", ("x", "router_logits", "gate_up", "down"), ("y",), {"top_k": "int", "normalize": "int"},
    {"ort": _lower_ort, "portable": _lower_dense, "decomposed": _lower_dense},
))


def translate_moe(x, router_logits, gate_up, down, top_k: int, normalize: int):
    return emit("MixtureOfExperts", x, router_logits, gate_up, down, top_k=top_k, normalize=normalize)


TRANSLATIONS = {torch.ops.edgekit.moe.default: translate_moe}
