"""The gated delta rule in chunked parallel form, in standard ONNX ops (fp32 throughout).

With chunk length C = min(S, 64) and N = ceil(S / C) chunks, per chunk (all chunks at once):
    kb, vb = k*beta, v*beta;  cg = cumsum(g) within the chunk;  D[i,j] = exp(cg_i - cg_j) for j <= i
    T = (I + L)^-1 where L = strict_lower(kb kᵀ ∘ D)      -- the UT transform of the delta rule
    U = T vb,  W = T (kb ∘ exp(cg)),  A = (q kᵀ) ∘ D
then one Loop over chunks carries the state S (B, Hv, dk, dv):
    u = U_i - W_i S;   o_i = (q_i ∘ exp(cg)) S + A_i u;   S = exp(cg_last) S + (k_i ∘ exp(cg_last - cg))ᵀ u

(I + L)^-1 for strictly lower-triangular L (nilpotent, L^C = 0 with C <= 64) is the product
(I - L)(I + L²)(I + L⁴)(I + L⁸)(I + L¹⁶)(I + L³²): six batched MatMuls instead of a
token-by-token substitution, so the graph is the same for any length.
"""

from __future__ import annotations

from typing import Any

from edgekit.errors import InternalError
from edgekit.export.ops._base import FLOAT

CHUNK = 64
SQUARINGS = 5  # (I + L^(2^j)) for j = 1..5 covers C <= 64


def static_last(value: Any, axis: int) -> int:
    """A dimension that must be static (state sizes), or an internal error naming the value."""
    dim = value.shape[axis] if value.shape is not None else None
    if not isinstance(dim, int):
        raise InternalError(f"{value.name} needs a static dim {axis}, has {value.shape}")
    return dim


def l2norm_heads(ctx, x, heads: int, d: int):
    """Per-head x / sqrt(sum(x^2) + 1e-6). x (B, S, N*d) float32 -> same shape."""
    x4 = ctx.op("Reshape", [x, ctx.const([0, 0, heads, d])])  # (B, S, N, d)
    sq = ctx.op("ReduceSum", [ctx.op("Mul", [x4, x4]), ctx.const([-1])], {"keepdims": 1})  # (B, S, N, 1)
    inv = ctx.op("Reciprocal", [ctx.op("Sqrt", [ctx.op("Add", [sq, ctx.const(1e-6, "float32")])])])
    return ctx.op("Reshape", [ctx.op("Mul", [x4, inv]), ctx.const([0, 0, heads * d])])  # (B, S, N*d)


def repeat_heads(ctx, x, heads: int, group: int, d: int):
    """Each head repeated ``group`` times, consecutively. (B, S, N*d) -> (B, S, N*group*d)."""
    x5 = ctx.op("Unsqueeze", [ctx.op("Reshape", [x, ctx.const([0, 0, heads, d])]), ctx.const([3])])  # (B,S,N,1,d)
    x5 = ctx.op("Expand", [x5, ctx.const([1, 1, 1, group, 1])])  # (B, S, N, group, d)
    return ctx.op("Reshape", [x5, ctx.const([0, 0, heads * group * d])])  # (B, S, N*group*d)


def _heads_first(ctx, x, heads: int, d: int):
    """(B, S, N*d) -> (B, N, S, d)."""
    return ctx.op("Transpose", [ctx.op("Reshape", [x, ctx.const([0, 0, heads, d])])], {"perm": [0, 2, 1, 3]})


def lower(ctx, q, k, v, g, beta, past, hk: int, hv: int, scale: float, dtype) -> tuple[Any, Any]:
    """Returns (out (B, S, Hv*dv) in ``dtype``, present_state (B, Hv, dk, dv) float32)."""
    dk, dv = static_last(past, 2), static_last(past, 3)
    qf = l2norm_heads(ctx, ctx.cast(q, dtype, FLOAT), hk, dk)
    kf = l2norm_heads(ctx, ctx.cast(k, dtype, FLOAT), hk, dk)
    if hv != hk:
        qf, kf = repeat_heads(ctx, qf, hk, hv // hk, dk), repeat_heads(ctx, kf, hk, hv // hk, dk)
    q4 = ctx.op("Mul", [_heads_first(ctx, qf, hv, dk), ctx.const(scale, "float32")])  # (B, Hv, S, dk)
    k4 = _heads_first(ctx, kf, hv, dk)  # (B, Hv, S, dk)
    v4 = _heads_first(ctx, ctx.cast(v, dtype, FLOAT), hv, dv)  # (B, Hv, S, dv)
    g3 = ctx.op("Transpose", [g], {"perm": [0, 2, 1]})  # (B, Hv, S)
    b3 = ctx.op("Transpose", [ctx.cast(beta, dtype, FLOAT)], {"perm": [0, 2, 1]})  # (B, Hv, S)
    seq, size, count, pad = _chunk_sizes(ctx, q)
    chunk = lambda x, d: _to_chunks(ctx, x, pad, count, size, d)  # noqa: E731
    qc, kc, vc = chunk(q4, dk), chunk(k4, dk), chunk(v4, dv)  # (B, Hv, N, C, d)
    gc, bc = chunk(g3, None), chunk(b3, None)  # (B, Hv, N, C)
    parts = _chunk_local(ctx, qc, kc, vc, gc, bc, size)
    state, stacked = _scan_chunks(ctx, parts, past, count)
    out = ctx.op("Transpose", [stacked], {"perm": [1, 2, 0, 3, 4]})  # (N, B, Hv, C, dv) -> (B, Hv, N, C, dv)
    out = ctx.op("Reshape", [out, ctx.const([0, 0, -1, dv])])  # (B, Hv, N*C, dv)
    out = ctx.op("Slice", [out, ctx.const([0]), seq, ctx.const([2])])  # (B, Hv, S, dv): drop the padding
    out = ctx.op("Transpose", [out], {"perm": [0, 2, 1, 3]})  # (B, S, Hv, dv)
    out = ctx.op("Reshape", [out, ctx.const([0, 0, hv * dv])])  # (B, S, Hv*dv)
    return ctx.cast(out, FLOAT, dtype), state


def _chunk_sizes(ctx, q):
    """S, C = min(S, 64), N = ceil(S / C) and the padding N*C - S, each a (1,) int64."""
    seq = ctx.op("Shape", [q], {"start": 1, "end": 2})
    size = ctx.op("Min", [seq, ctx.const([CHUNK])])
    pad = ctx.op("Mod", [ctx.op("Sub", [size, ctx.op("Mod", [seq, size])]), size])
    count = ctx.op("Div", [ctx.op("Add", [seq, pad]), size])
    return seq, size, count, pad


def _to_chunks(ctx, x, pad, count, size, d):
    """Zero-pad the sequence axis (2) to N*C and split it: (B, Hv, S[, d]) -> (B, Hv, N, C[, d])."""
    rank_tail = [] if d is None else [0]
    pads = ctx.op("Concat", [ctx.const([0, 0, 0, *rank_tail, 0, 0]), pad, ctx.const(rank_tail)], {"axis": 0})
    padded = ctx.op("Pad", [x, pads])
    shape = ctx.op("Concat", [ctx.const([0, 0]), count, size, ctx.const([] if d is None else [d])], {"axis": 0})
    return ctx.op("Reshape", [padded, shape])


def _chunk_local(ctx, qc, kc, vc, gc, bc, size) -> dict[str, Any]:
    """Everything that does not depend on the carried state, for all chunks at once."""
    positions = ctx.op("Range", [ctx.const(0), ctx.op("Squeeze", [size, ctx.const([0])]), ctx.const(1)])  # (C,)
    rows = ctx.op("Unsqueeze", [positions, ctx.const([1])])  # (C, 1)
    lower = ctx.op("GreaterOrEqual", [rows, positions])  # (C, C): j <= i
    strict = ctx.op("Greater", [rows, positions])  # (C, C): j < i
    eye = ctx.op("Cast", [ctx.op("Equal", [rows, positions])], {"to": FLOAT})  # (C, C)
    cg = ctx.op("CumSum", [gc, ctx.const(3)])  # (B, Hv, N, C)
    diff = ctx.op("Sub", [ctx.op("Unsqueeze", [cg, ctx.const([4])]), ctx.op("Unsqueeze", [cg, ctx.const([3])])])
    decay = ctx.op("Exp", [ctx.op("Where", [lower, diff, ctx.const(-1e30, "float32")])])  # (B, Hv, N, C, C)
    rate = ctx.op("Unsqueeze", [bc, ctx.const([4])])  # (B, Hv, N, C, 1)
    kb, vb = ctx.op("Mul", [kc, rate]), ctx.op("Mul", [vc, rate])
    k_t = ctx.op("Transpose", [kc], {"perm": [0, 1, 2, 4, 3]})  # (B, Hv, N, dk, C)
    lower_part = ctx.op("Where", [strict, ctx.op("Mul", [ctx.op("MatMul", [kb, k_t]), decay]),
                                  ctx.const(0.0, "float32")])  # (B, Hv, N, C, C)
    solve = _unit_lower_inverse(ctx, ctx.op("Neg", [lower_part]), eye)
    grow = ctx.op("Exp", [ctx.op("Unsqueeze", [cg, ctx.const([4])])])  # (B, Hv, N, C, 1)
    last = ctx.op("Slice", [cg, ctx.const([-1]), ctx.const([2**62]), ctx.const([3])])  # (B, Hv, N, 1)
    to_end = ctx.op("Exp", [ctx.op("Unsqueeze", [ctx.op("Sub", [last, cg]), ctx.const([4])])])  # (B, Hv, N, C, 1)
    return {
        "u": ctx.op("MatMul", [solve, vb]),  # (B, Hv, N, C, dv)
        "w": ctx.op("MatMul", [solve, ctx.op("Mul", [kb, grow])]),  # (B, Hv, N, C, dk)
        "a": ctx.op("Mul", [ctx.op("MatMul", [qc, k_t]), decay]),  # (B, Hv, N, C, C)
        "q": ctx.op("Mul", [qc, grow]),  # (B, Hv, N, C, dk)
        "k": ctx.op("Mul", [kc, to_end]),  # (B, Hv, N, C, dk)
        "decay": ctx.op("Exp", [ctx.op("Unsqueeze", [last, ctx.const([4])])]),  # (B, Hv, N, 1, 1)
    }


def _unit_lower_inverse(ctx, neg_lower, eye):
    """(I + L)^-1 = (I - L)(I + L^2)(I + L^4)... for nilpotent L; ``neg_lower`` = -L."""
    inverse = ctx.op("Add", [eye, neg_lower])
    power = neg_lower
    for _ in range(SQUARINGS):
        power = ctx.op("MatMul", [power, power])
        inverse = ctx.op("MatMul", [inverse, ctx.op("Add", [eye, power])])
    return inverse


def _scan_chunks(ctx, parts: dict[str, Any], past, count):
    """Loop over the N chunks carrying the state; returns (final state, outputs (N, B, Hv, C, dv))."""
    import onnx_ir as ir

    prefix = ctx.prefix
    step = ir.Value(name=f"{prefix}/loop/i", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=f"{prefix}/loop/cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    state = ir.Value(name=f"{prefix}/loop/state", type=ir.TensorType(ir.DataType.FLOAT),
                     shape=ir.Shape([None, None, None, None]))

    def body():
        # Only attribute-carrying ops here: constants cached by ctx.const live in the outer graph.
        pick = {name: ctx.op("Gather", [value, step], {"axis": 2}) for name, value in parts.items()}
        update = ctx.op("Sub", [pick["u"], ctx.op("MatMul", [pick["w"], state])])  # (B, Hv, C, dv)
        out = ctx.op("Add", [ctx.op("MatMul", [pick["q"], state]), ctx.op("MatMul", [pick["a"], update])])
        k_t = ctx.op("Transpose", [pick["k"]], {"perm": [0, 1, 3, 2]})  # (B, Hv, dk, C)
        new_state = ctx.op("Add", [ctx.op("Mul", [state, pick["decay"]]), ctx.op("MatMul", [k_t, update])])
        return [ctx.op("Identity", [cond]), new_state, out]

    ctx.prefix = f"{prefix}/loop"
    graph = ctx.subgraph(f"{prefix}/loop_body", [step, cond, state], body)
    ctx.prefix = prefix
    trips = ctx.op("Squeeze", [count, ctx.const([0])])
    final, stacked = ctx.multi("Loop", [trips, None, past], {"body": graph}, 2)
    return final, stacked
