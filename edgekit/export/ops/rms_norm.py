"""RMSNorm and residual-add + RMSNorm as edgekit ops.

ort:        SimplifiedLayerNormalization / com.microsoft SkipSimplifiedLayerNormalization
portable:   RMSNormalization (opset 23), preceded by Add for the fused form
decomposed: Mul/ReduceMean/Add/Sqrt/Div, for parsers without RMSNormalization (TensorRT < 10.15)
All compute the statistics in fp32 (stash_type=1), like Hugging Face's RMSNorm.
"""

from __future__ import annotations

import torch

from edgekit.errors import InternalError
from edgekit.export.ops._base import FLOAT, OpDef, emit, register_op



@torch.library.custom_op("edgekit::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = weight * x / sqrt(mean(x^2) + eps), statistics in fp32."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@rms_norm.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@torch.library.custom_op("edgekit::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the norm and the new residual stream."""
    total = x + residual
    return rms_norm(total, weight, eps), total


@add_rms_norm.register_fake
def _(x, residual, weight, eps):
    return torch.empty_like(x), torch.empty_like(x)


def _lower_rms_ort(ctx, node):
    x, w = node.inputs
    eps = node.attributes["epsilon"].as_float()
    return [ctx.op("SimplifiedLayerNormalization", [x, w], {"axis": -1, "epsilon": eps, "stash_type": 1})]


def _lower_rms_portable(ctx, node):
    x, w = node.inputs
    return [_rms_normalization(ctx, x, w, node.attributes["epsilon"].as_float())]


def _lower_add_rms_ort(ctx, node):
    x, residual, w = node.inputs
    eps = node.attributes["epsilon"].as_float()
    # Outputs: output, mean, inv_std_var, input_skip_bias_sum.
    out = ctx.multi("SkipSimplifiedLayerNormalization", [x, residual, w], {"epsilon": eps}, 4, domain="com.microsoft")
    return [out[0], out[3]]


def _lower_add_rms_portable(ctx, node):
    x, residual, w = node.inputs
    total = ctx.op("Add", [x, residual])
    return [_rms_normalization(ctx, total, w, node.attributes["epsilon"].as_float()), total]


def _lower_rms_decomposed(ctx, node):
    x, w = node.inputs
    return [_rms_decomposed(ctx, x, w, node.attributes["epsilon"].as_float(), x.dtype)]


def _lower_add_rms_decomposed(ctx, node):
    x, residual, w = node.inputs
    total = ctx.op("Add", [x, residual])
    return [_rms_decomposed(ctx, total, w, node.attributes["epsilon"].as_float(), x.dtype), total]


def _rms_normalization(ctx, x, w, eps):
    return ctx.op("RMSNormalization", [x, w], {"axis": -1, "epsilon": eps, "stash_type": 1})


def _rms_decomposed(ctx, x, w, eps, dtype):
    """weight * cast_back(x / sqrt(mean(x^2, -1) + eps)), statistics in fp32 like the torch kernel.

    ``dtype`` is x's element type, passed in because a fresh tape value (the fused Add) has none yet.
    """
    if dtype is None:
        raise InternalError(f"the decomposed RMSNorm lowering needs the element type of {x.name}")
    dtype = int(dtype)
    xf = ctx.cast(x, dtype, FLOAT)
    mean_sq = ctx.op("ReduceMean", [ctx.op("Mul", [xf, xf]), ctx.const([-1])], {"keepdims": 1})  # (..., 1)
    rms = ctx.op("Sqrt", [ctx.op("Add", [mean_sq, ctx.const(eps, "float32")])])
    normed = ctx.op("Div", [xf, rms])  # (..., hidden) fp32
    return ctx.op("Mul", [w, ctx.cast(normed, FLOAT, dtype)])


RMS_NORM = register_op(
    OpDef("RMSNorm", ("x", "weight"), ("y",), {"epsilon": "float"},
          {"ort": _lower_rms_ort, "portable": _lower_rms_portable, "decomposed": _lower_rms_decomposed})
)
ADD_RMS_NORM = register_op(
    OpDef("AddRMSNorm", ("x", "residual", "weight"), ("y", "sum"), {"epsilon": "float"},
          {"ort": _lower_add_rms_ort, "portable": _lower_add_rms_portable,
           "decomposed": _lower_add_rms_decomposed})
)


def translate_rms_norm(x, weight, eps: float):
    return emit("RMSNorm", x, weight, epsilon=eps)


def translate_add_rms_norm(x, residual, weight, eps: float):
    return emit("AddRMSNorm", x, residual, weight, epsilon=eps)


TRANSLATIONS = {
    torch.ops.edgekit.rms_norm.default: translate_rms_norm,
    torch.ops.edgekit.add_rms_norm.default: translate_add_rms_norm,
}
