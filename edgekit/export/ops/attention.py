"""Causal self-attention with rotary embedding and KV cache, as one edgekit op.

Inputs (B = batch, S = new tokens, P = cached tokens, T = P + S):
    q (B, S, H*D), k and v (B, S, KV*D)      projections, before rotary
    past_key, past_value (B, KV, P, D)        the cache
    attention_mask (B, T) int64               1 for real tokens (right padding)
    cos_cache, sin_cache (max_pos, R/2)       rotary tables, R = rotary dim <= D
Outputs: out (B, S, H*D), present_key and present_value (B, KV, T, D).

Lowerings:
    ort       one com.microsoft GroupQueryAttention node with rotary fused. Given
              past and present bound to one preallocated (B, KV, max_len, D) buffer,
              GQA writes the new rows in place, so decode copies no cache. Where the
              kernel refuses the rotary tables (see gqa_rotary_fits), q and k are
              rotated by plain ops first and GQA runs with do_rotary=0.
    portable  RotaryEmbedding (opset 23), Concat onto the cache, opset-23 Attention
              with a boolean mask; the KV update stays outside the Attention node,
              which keeps one output as TensorRT's parser requires.

                 q ──RotaryEmbedding──────────────────────────┐
    k ──RotaryEmbedding──Reshape/Transpose──Concat(past_key)──Attention──Transpose/Reshape── out
    v ─────────────────────Reshape/Transpose──Concat(past_value)──┘

    decomposed  the same dataflow in ops TensorRT < 10.14 parses (JetPack 6.x ships 10.3):
              rotary as Gather(cos/sin rows) + half-split Mul/Sub/Add, the same Concat
              KV update, GQA by Expand, MatMul/Softmax attention with a Where mask
              (merge = Transpose/Reshape back to (B, S, H*D)).

    q ──Reshape──rotate──Transpose────────────────────────────────┐
    k ──Reshape──rotate──Transpose──Concat(past_key)───Expand──MatMul·scale──Where(mask)──Softmax─┐
    v ──Reshape──────────Transpose──Concat(past_value)─Expand──────────────────────────────────MatMul──merge── out
"""

from __future__ import annotations

import torch

from edgekit.errors import InternalError, UnsupportedArchitectureError
from edgekit.export.ops._base import FLOAT, OpDef, emit, register_op


def _positions(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Positions of the S new tokens: total length - S + arange(S). -> (B, S)"""
    total = attention_mask.sum(-1, keepdim=True)
    return total - seq_len + torch.arange(seq_len, device=attention_mask.device)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary on the first R dims. x (B, S, N, D), cos/sin (B, S, R/2)."""
    rot = cos.shape[-1] * 2
    x1, x2, rest = x[..., : rot // 2], x[..., rot // 2 : rot], x[..., rot:]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, S, 1, R/2)
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s, rest], dim=-1)


@torch.library.custom_op("edgekit::attention", mutates_args=())
def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    past_key: torch.Tensor, past_value: torch.Tensor, attention_mask: torch.Tensor,
    cos_cache: torch.Tensor, sin_cache: torch.Tensor,
    num_heads: int, num_kv_heads: int, scale: float, window: int, softcap: float, layer: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference kernel (eager torch); the ONNX lowerings must match it."""
    b, s, _ = q.shape
    d = past_key.shape[-1]
    pos = _positions(attention_mask, s)  # (B, S)
    cos, sin = cos_cache[pos], sin_cache[pos]  # (B, S, R/2)
    q4 = _rotate(q.view(b, s, num_heads, d), cos, sin).transpose(1, 2)  # (B, H, S, D)
    k4 = _rotate(k.view(b, s, num_kv_heads, d), cos, sin).transpose(1, 2)  # (B, KV, S, D)
    v4 = v.view(b, s, num_kv_heads, d).transpose(1, 2)  # (B, KV, S, D)
    present_key = torch.cat([past_key, k4], dim=2)  # (B, KV, T, D)
    present_value = torch.cat([past_value, v4], dim=2)
    group = num_heads // num_kv_heads
    keys = present_key.repeat_interleave(group, dim=1)  # (B, H, T, D)
    values = present_value.repeat_interleave(group, dim=1)
    scores = (q4 @ keys.transpose(-1, -2)).float() * scale  # (B, H, S, T)
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    key_pos = torch.arange(present_key.shape[2], device=q.device)  # (T,)
    allowed = key_pos[None, None, :] <= pos[:, :, None]  # (B, S, T)
    if window > 0:
        allowed = allowed & (key_pos[None, None, :] > pos[:, :, None] - window)
    allowed = allowed & attention_mask.bool()[:, None, :]
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(q.dtype)
    out = (probs @ values).transpose(1, 2).reshape(b, s, num_heads * d)  # (B, S, H*D)
    return out, present_key, present_value


@attention.register_fake
def _(q, k, v, past_key, past_value, attention_mask, cos_cache, sin_cache,
      num_heads, num_kv_heads, scale, window, softcap, layer):
    b, kv, p, d = past_key.shape
    total = p + q.shape[1]
    return torch.empty_like(q), past_key.new_empty(b, kv, total, d), past_value.new_empty(b, kv, total, d)


def _attrs(node) -> dict:
    a = node.attributes
    return {
        "num_heads": a["num_heads"].as_int(), "num_kv_heads": a["num_kv_heads"].as_int(),
        "scale": a["scale"].as_float(), "window": a["window"].as_int(),
        "softcap": a["softcap"].as_float(), "layer": a["layer"].as_int(),
    }


def _lengths(ctx, mask):
    """seqlens_k = tokens - 1 (int32, (B,)) and total_sequence_length (int32 scalar) for GQA."""
    def build():
        tokens = ctx.op("ReduceSum", [mask, ctx.const([1])], {"keepdims": 0})  # (B,)
        seqlens = ctx.op("Cast", [ctx.op("Sub", [tokens, ctx.const(1)])], {"to": 6})  # int32
        width = ctx.op("Shape", [mask], {"start": 1, "end": 2})  # (1,)
        total = ctx.op("Cast", [ctx.op("Squeeze", [width, ctx.const([0])])], {"to": 6})  # ()
        return seqlens, total
    return ctx.once(("gqa_lengths", mask.name), build)


def gqa_rotary_fits(head_dim: int, half: int) -> bool:
    """Whether GroupQueryAttention can rotate inside the kernel: ONNX Runtime needs head_dim % 16 == 0
    and a cos/sin width R/2 that is a multiple of 8 and <= head_dim / 2.

    The kernel checks this at the first forward pass, not at load: R/2 = 4 on a 32-wide head (Qwen3.5
    with partial_rotary_factor 0.25), or any rotary on a 24- or 40-wide head, fails there.
    tests/export/test_gqa_rotary.py holds this rule against the installed kernel.
    """
    return head_dim % 16 == 0 and half % 8 == 0 and half <= head_dim // 2


def check_gqa_head(head_dim: int, layer: int) -> None:
    """Refuse, at export, a head size GroupQueryAttention rejects at run time (not a multiple of 8)."""
    if head_dim % 8:
        raise UnsupportedArchitectureError(
            f"layer {layer}: head_dim {head_dim} is not a multiple of 8, which ONNX Runtime's "
            "GroupQueryAttention (the ort target's attention) requires",
            "export with --target portable (standard ONNX attention), which runs on ONNX Runtime too",
        )


def _lower_ort(ctx, node):
    """GQA with rotary fused when the kernel takes these tables; else rotary first, GQA do_rotary=0.

        fused:    q, k, v, past ──GroupQueryAttention(cos, sin)── out, present (in place)
        outside:  q ──Reshape──rotate──Reshape──┐
                  k ──Reshape──rotate──Reshape──GroupQueryAttention(no cos/sin)── out, present
    """
    q, k, v, past_k, past_v, mask, cos, sin = node.inputs
    a = _attrs(node)
    ctx.prefix = f"/model/layers.{a['layer']}/attn"
    d, half = _static_dim(past_k, "past_key"), _static_dim(cos, "cos_cache")
    check_gqa_head(d, a["layer"])
    fused = gqa_rotary_fits(d, half)
    seqlens, total = _lengths(ctx, mask)
    attrs = {
        "num_heads": a["num_heads"], "kv_num_heads": a["num_kv_heads"], "scale": a["scale"],
        "local_window_size": a["window"] if a["window"] > 0 else -1,
        "softcap": a["softcap"], "do_rotary": int(fused), "rotary_interleaved": 0,
    }
    if fused:
        inputs = [q, k, v, past_k, past_v, seqlens, total, cos, sin]
    else:
        positions = _portable_positions(ctx, mask, q)  # (B, S): what GQA derives from seqlens_k
        c, s = _rotary_rows(ctx, cos, sin, positions)  # (B, S, 1, R/2)
        q, k = (_rotate_flat(ctx, x, n, c, s, half, d) for x, n in ((q, a["num_heads"]), (k, a["num_kv_heads"])))
        inputs = [q, k, v, past_k, past_v, seqlens, total]
    return ctx.multi("GroupQueryAttention", inputs, attrs, 3, domain="com.microsoft")


def _rotate_flat(ctx, x, n, cos, sin, half, d):
    """Rotary on (B, S, N*D) projections, as GQA would have applied it; -> (B, S, N*D)."""
    x4 = _rotate_halves(ctx, _split_heads(ctx, x, n), cos, sin, half, d)  # (B, S, N, D)
    return ctx.op("Reshape", [x4, ctx.const([0, 0, -1])])  # (B, S, N, D) -> (B, S, N*D)


def _portable_positions(ctx, mask, q):
    """(B, S) int64 positions of the new tokens: tokens - S + arange(S)."""
    def build():
        tokens = ctx.op("ReduceSum", [mask, ctx.const([1])], {"keepdims": 1})  # (B, 1)
        seq = ctx.op("Shape", [q], {"start": 1, "end": 2})  # (1,)
        seq_scalar = ctx.op("Squeeze", [seq, ctx.const([0])])
        steps = ctx.op("Range", [ctx.const(0), seq_scalar, ctx.const(1)])  # (S,)
        first = ctx.op("Sub", [tokens, seq])  # (B, 1)
        return ctx.op("Add", [first, steps])  # (B, S)
    return ctx.once(("positions", mask.name), build)


def _portable_mask(ctx, mask, positions, window):
    """(B, 1, S, T) bool: key j visible to query i iff j <= pos_i, inside the window, and not padding."""
    def build():
        width = ctx.op("Squeeze", [ctx.op("Shape", [mask], {"start": 1, "end": 2}), ctx.const([0])])
        keys = ctx.op("Range", [ctx.const(0), width, ctx.const(1)])  # (T,)
        query = ctx.op("Unsqueeze", [positions, ctx.const([2])])  # (B, S, 1)
        allowed = ctx.op("LessOrEqual", [keys, query])  # (B, S, T)
        if window > 0:
            lowest = ctx.op("Sub", [query, ctx.const(window)])
            allowed = ctx.op("And", [allowed, ctx.op("Greater", [keys, lowest])])
        real = ctx.op("Cast", [ctx.op("Unsqueeze", [mask, ctx.const([1])])], {"to": 9})  # (B, 1, T)
        allowed = ctx.op("And", [allowed, real])
        return ctx.op("Unsqueeze", [allowed, ctx.const([1])])  # (B, 1, S, T)
    return ctx.once(("mask", mask.name, window), build)


def _begin(ctx, node):
    """Attributes, the per-graph positions (B, S) and mask (B, 1, S, T); sets the layer's name prefix."""
    q, mask = node.inputs[0], node.inputs[5]
    a = _attrs(node)
    positions = _portable_positions(ctx, mask, q)
    allowed = _portable_mask(ctx, mask, positions, a["window"])
    ctx.prefix = f"/model/layers.{a['layer']}/attn"
    return a, positions, allowed


def _split_heads(ctx, x, n):
    return ctx.op("Reshape", [x, ctx.const([0, 0, n, -1])])  # (B, S, N*D) -> (B, S, N, D)


def _swap_seq_heads(ctx, x):
    return ctx.op("Transpose", [x], {"perm": [0, 2, 1, 3]})  # (B, S, N, D) <-> (B, N, S, D)


def _merge_heads(ctx, y):
    return ctx.op("Reshape", [_swap_seq_heads(ctx, y), ctx.const([0, 0, -1])])  # (B, H, S, D) -> (B, S, H*D)


def _append_cache(ctx, past_k, past_v, k4, v4):
    """The KV update, kept outside attention: present = past ++ new on the sequence axis."""
    present_k = ctx.op("Concat", [past_k, k4], {"axis": 2})  # (B, KV, T, D)
    present_v = ctx.op("Concat", [past_v, v4], {"axis": 2})
    return present_k, present_v


def _lower_portable(ctx, node):
    q, k, v, past_k, past_v, mask, cos, sin = node.inputs
    a, positions, allowed = _begin(ctx, node)
    h, kv = a["num_heads"], a["num_kv_heads"]
    d = past_k.shape[-1] if past_k.shape is not None else None
    rot_dim = cos.shape[-1] * 2 if cos.shape is not None and isinstance(cos.shape[-1], int) else 0
    rope = {"interleaved": 0}
    if rot_dim and d and rot_dim != d:
        rope["rotary_embedding_dim"] = rot_dim
    q_rot = ctx.op("RotaryEmbedding", [q, cos, sin, positions], {**rope, "num_heads": h})  # (B, S, H*D)
    k_rot = ctx.op("RotaryEmbedding", [k, cos, sin, positions], {**rope, "num_heads": kv})
    q4 = _swap_seq_heads(ctx, _split_heads(ctx, q_rot, h))  # (B, H, S, D)
    k4 = _swap_seq_heads(ctx, _split_heads(ctx, k_rot, kv))  # (B, KV, S, D)
    present_k, present_v = _append_cache(ctx, past_k, past_v, k4, _swap_seq_heads(ctx, _split_heads(ctx, v, kv)))
    attrs = {"scale": a["scale"]}
    if a["softcap"] > 0:
        attrs["softcap"] = a["softcap"]
    y = ctx.op("Attention", [q4, present_k, present_v, allowed], attrs)  # (B, H, S, D)
    return [_merge_heads(ctx, y), present_k, present_v]


def _lower_decomposed(ctx, node):
    q, k, v, past_k, past_v, _, cos, sin = node.inputs
    a, positions, allowed = _begin(ctx, node)
    h, kv = a["num_heads"], a["num_kv_heads"]
    d, half = _static_dim(past_k, "past_key"), _static_dim(cos, "cos_cache")
    if q.dtype is None:
        raise InternalError("the decomposed attention lowering needs q's element type")
    c, s = _rotary_rows(ctx, cos, sin, positions)  # (B, S, 1, R/2) each
    q4 = _swap_seq_heads(ctx, _rotate_halves(ctx, _split_heads(ctx, q, h), c, s, half, d))  # (B, H, S, D)
    k4 = _swap_seq_heads(ctx, _rotate_halves(ctx, _split_heads(ctx, k, kv), c, s, half, d))  # (B, KV, S, D)
    present_k, present_v = _append_cache(ctx, past_k, past_v, k4, _swap_seq_heads(ctx, _split_heads(ctx, v, kv)))
    keys = _repeat_kv(ctx, present_k, h // kv, h, d)  # (B, H, T, D)
    values = _repeat_kv(ctx, present_v, h // kv, h, d)
    y = _attend(ctx, q4, keys, values, allowed, a, q.dtype)  # (B, H, S, D)
    return [_merge_heads(ctx, y), present_k, present_v]


def _static_dim(value, name):
    dim = value.shape[-1] if value.shape is not None else None
    if not isinstance(dim, int):
        raise InternalError(f"the attention lowerings need a static last dim on {name}, got {dim!r}")
    return dim


def _rotary_rows(ctx, cos, sin, positions):
    """cos/sin rows at the new tokens' positions, once per graph: (max_pos, R/2) -> (B, S, 1, R/2)."""
    def build():
        rows = [ctx.op("Gather", [table, positions], {"axis": 0}) for table in (cos, sin)]  # (B, S, R/2)
        return tuple(ctx.op("Unsqueeze", [row, ctx.const([2])]) for row in rows)  # (B, S, 1, R/2)
    return ctx.once(("rotary_rows", cos.name, sin.name, positions), build)


def _rotate_halves(ctx, x4, cos, sin, half, d):
    """Half-split rotary on the first R = 2*half dims of x4 (B, S, N, D); the rest passes through."""
    sizes = [half, half] + ([d - 2 * half] if 2 * half < d else [])
    x1, x2, *rest = ctx.multi("Split", [x4, ctx.const(sizes)], {"axis": -1}, len(sizes))  # (B, S, N, R/2) ...
    first = ctx.op("Sub", [ctx.op("Mul", [x1, cos]), ctx.op("Mul", [x2, sin])])  # x1*c - x2*s
    second = ctx.op("Add", [ctx.op("Mul", [x2, cos]), ctx.op("Mul", [x1, sin])])  # x2*c + x1*s
    return ctx.op("Concat", [first, second, *rest], {"axis": -1})  # (B, S, N, D)


def _repeat_kv(ctx, x, group, h, d):
    """GQA: each KV head repeated ``group`` times in a row, like repeat_interleave(group, dim=1)."""
    if group == 1:
        return x
    x5 = ctx.op("Unsqueeze", [x, ctx.const([2])])  # (B, KV, 1, T, D)
    wide = ctx.op("Expand", [x5, ctx.const([1, 1, group, 1, 1])])  # (B, KV, group, T, D)
    return ctx.op("Reshape", [wide, ctx.const([0, h, -1, d])])  # (B, H, T, D)


def _attend(ctx, q4, keys, values, allowed, a, dtype):
    """softmax(masked(softcap(q @ k^T * scale))) @ v; scores and softmax in fp32 like the reference.

    Masked scores get float32's lowest value rather than -inf: every query sees at least
    itself, so no row is fully masked and exp() of the rest is exactly 0 either way.
    """
    import numpy as np

    keys_t = ctx.op("Transpose", [keys], {"perm": [0, 1, 3, 2]})  # (B, H, T, D) -> (B, H, D, T)
    scores = ctx.cast(ctx.op("MatMul", [q4, keys_t]), dtype, FLOAT)  # (B, H, S, T)
    scores = ctx.op("Mul", [scores, ctx.const(a["scale"], "float32")])
    if a["softcap"] > 0:
        cap = ctx.const(a["softcap"], "float32")
        scores = ctx.op("Mul", [ctx.op("Tanh", [ctx.op("Div", [scores, cap])]), cap])
    scores = ctx.op("Where", [allowed, scores, ctx.const(np.finfo(np.float32).min, "float32")])
    probs = ctx.cast(ctx.op("Softmax", [scores], {"axis": -1}), FLOAT, dtype)  # (B, H, S, T)
    return ctx.op("MatMul", [probs, values])  # (B, H, S, D)


ATTENTION = register_op(
    OpDef(
        "CausalAttention",
        ("q", "k", "v", "past_key", "past_value", "attention_mask", "cos_cache", "sin_cache"),
        ("out", "present_key", "present_value"),
        {"num_heads": "int", "num_kv_heads": "int", "scale": "float", "window": "int", "softcap": "float", "layer": "int"},
        {"ort": _lower_ort, "portable": _lower_portable, "decomposed": _lower_decomposed},
    )
)


def translate_attention(q, k, v, past_key, past_value, attention_mask, cos_cache, sin_cache,
                        num_heads: int, num_kv_heads: int, scale: float, window: int, softcap: float, layer: int):
    return emit(
        "CausalAttention", q, k, v, past_key, past_value, attention_mask, cos_cache, sin_cache,
        num_heads=num_heads, num_kv_heads=num_kv_heads, scale=scale, window=window, softcap=softcap, layer=layer,
    )


TRANSLATIONS = {torch.ops.edgekit.attention.default: translate_attention}
