"""fp8 (e4m3) Q/DQ on the weights and activations of every constant-weight MatMul, for sm_89+ profiles;
and its INT8 sibling, SmoothQuant-style W8A8 (``quantize_w8a8``), for TensorRT INT8 on Orin (sm_87).

    x ─QuantizeLinear(sx, zero FLOAT8E4M3FN)→ DequantizeLinear(sx) ┐           (per tensor: one sx for
                                                                   MatMul → y    every MatMul reading x)
    W (K, N) fp32 ─e4m3→ Wq (K, N) FLOAT8E4M3FN ─DequantizeLinear(axis=1, sw (N,))┘   (per output channel)

Scales: sw = amax(W[:, n]) / 448 per output channel, sx = amax(x) / 448 over the calibration
tokens (``calibrate.matmul_input_stats``' AMAX row), both float32 and > 0 (TensorRT refuses
non-positive scales). Per-channel weights and per-tensor activations is the form ModelOpt's ONNX
fp8 quantizer emits for TensorRT; TensorRT's fp8 GEMM takes per-tensor activation scales only.
The zero point is an explicit FLOAT8E4M3FN 0, which is what sets QuantizeLinear's output type
(TensorRT accepts a zero point of 0). Activations beyond the calibrated amax saturate at ±448
(QuantizeLinear's default ``saturate=1``), as on the GPU.

ONNX Runtime's CPU provider executes QuantizeLinear / DequantizeLinear with FLOAT8E4M3FN (opset 23;
checked with onnxruntime 1.32): it rounds as ml_dtypes' float8_e4m3fn does (nearest even,
saturating), so quality is measured on CPU on the very graph a GPU gets; the MatMul itself runs
in fp32 there, where a GPU accumulates the fp8 products in fp32 too.

W8A8 is the same graph with INT8 (zero point 0, q in [-127, 127] for weights) and 127 for 448, and
a Mul by 1/s on each shared input before its QuantizeLinear (SmoothQuant, alpha 0.5: s per input
channel moves activation outliers into the weights). ONNX Runtime CPU runs it too (it may fuse
the INT8 Q/DQ into integer MatMuls), so its quality is measured the same way.

The LM head stays in its precision by default (``lm_head=False``): the logits' error is what the
quality figures measure, and ModelOpt's recipes leave it out as well.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

E4M3_MAX = 448.0
INT8_MAX = 127.0
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength


def quantize_fp8(proto, stats: dict, lm_head: bool = False) -> dict[str, Any]:
    """IN PLACE: e4m3 (FLOAT8E4M3FN) Q/DQ on the weights (per output channel) and activations (per
    tensor, scale from calibration amax) of every constant-weight MatMul of an fp32 graph.

    ``stats`` is ``calibrate.matmul_input_stats``' result for this graph. Returns a report: the
    quantized node names, each activation's scale, weight bytes before and after.
    """
    return _quantize_activations(proto, stats, "fp8", lm_head, smooth=None)


def quantize_w8a8(proto, stats: dict, lm_head: bool = False, alpha: float = SMOOTH_ALPHA) -> dict[str, Any]:
    """IN PLACE: SmoothQuant-style INT8 Q/DQ (per-channel weights, per-tensor activations, no zero
    point) on every constant-weight MatMul: each input x shared by MatMuls W1..Wm becomes
    x / s (a Mul) and each Wi diag(s) Wi, s_j = amax(x_j)^alpha / amax(W1..m[j, :])^(1 - alpha).
    For TensorRT INT8 on Orin (sm_87), which has no fp8. Report as ``quantize_fp8``'s, plus alpha.
    """
    return _quantize_activations(proto, stats, "int8", lm_head, smooth=alpha)


def _quantize_activations(proto, stats: dict, kind: str, lm_head: bool, smooth: float | None) -> dict[str, Any]:
    from onnx import numpy_helper

    from edgekit.precision.calibrate import AMAX
    from edgekit.precision.weight_only import (
        _constant_weight,
        drop_unused_initializers,
        insert_nodes,
    )
    from edgekit.quantize import _lm_head

    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    head = _lm_head(proto)
    targets = [(i, n) for i, n in enumerate(graph.node) if _constant_weight(n, inits) and (lm_head or n.name != head)]
    missing = [n.name for _, n in targets if n.name not in stats]
    if missing:
        raise EdgekitError(f"{kind} needs calibration statistics for every MatMul; {len(missing)} have none "
                           f"(first: {missing[0]})", "compute them on this same fp32 graph (matmul_input_stats)")
    report = {"format": kind, "quantized_matmuls": [], "activation_scales": {}, "lm_head_node": head,
              "weight_bytes_before": 0, "weight_bytes_after": 0, **({"smooth_alpha": smooth} if smooth else {})}
    groups: dict[str, list] = {}  # input tensor -> [(index, node)] of the MatMuls reading it
    for i, node in targets:
        groups.setdefault(node.input[0], []).append((i, node))
    before: dict[int, list] = {}  # node index -> nodes to insert before it
    for tensor, members in groups.items():
        weights = [numpy_helper.to_array(inits[node.input[1]]) for _, node in members]  # (K, N) each
        amax = stats[members[0][1].name][AMAX].astype(np.float64)  # (K,)
        new = []
        if smooth:
            s = _smoothing(amax, weights, smooth)
            new.append(_mul(graph, inits, tensor, (1 / s).astype(np.float32)))
            weights, amax = [w * s[:, None].astype(np.float32) for w in weights], amax / s
        new += _activation_qdq(graph, inits, new[-1].output[0] if new else tensor, kind, float(amax.max()), report)
        for (i, node), w in zip(members, weights):
            node.input[0] = new[-1].output[0]
            dq = _weight_dq(graph, inits, node.name, w, kind, report)
            node.input[1] = dq.output[0]
            before.setdefault(i, []).append(dq)
            report["quantized_matmuls"].append(node.name)
        before.setdefault(members[0][0], [])[:0] = new  # ahead of the first reader's weight DQ
    insert_nodes(graph, before)
    drop_unused_initializers(graph)
    return report


def e4m3(values: np.ndarray) -> np.ndarray:
    """``values`` rounded to float8 e4m3fn (nearest even, saturating at ±448), as float8 values."""
    import ml_dtypes

    return np.clip(values, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn)


def _smoothing(amax_x: np.ndarray, weights: list[np.ndarray], alpha: float) -> np.ndarray:
    """SmoothQuant's s (K,): activation outliers moved into the weights, half the range each at alpha 0.5."""
    amax_w = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)  # (K,)
    s = np.maximum(amax_x, 1e-5) ** alpha / np.maximum(amax_w, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-4, 1e4)


def _cast(values: np.ndarray, kind: str) -> np.ndarray:
    """Rounded to the stored type: e4m3, or int8 in [-127, 127] (nearest even, as QuantizeLinear)."""
    return e4m3(values) if kind == "fp8" else np.clip(np.rint(values), -INT8_MAX, INT8_MAX).astype(np.int8)


def _mul(graph, inits: dict, tensor: str, factor: np.ndarray):
    from onnx import helper, numpy_helper

    name = f"{tensor}/smooth"
    _add(graph, inits, numpy_helper.from_array(factor, f"{name}/inv_scale"))
    return helper.make_node("Mul", [tensor, f"{name}/inv_scale"], [f"{name}/out"], name=f"{name}/mul")


def _activation_qdq(graph, inits: dict, tensor: str, kind: str, amax: float, report: dict) -> list:
    from onnx import helper, numpy_helper

    top = E4M3_MAX if kind == "fp8" else INT8_MAX
    scale = np.float32(amax / top if amax > 0 else 1.0)
    prefix = f"{tensor}/{kind}"
    report["activation_scales"][tensor] = float(scale)
    _add(graph, inits, numpy_helper.from_array(np.asarray(scale, np.float32), f"{prefix}/scale"))
    _add(graph, inits, numpy_helper.from_array(_cast(np.zeros((), np.float32), kind), f"{prefix}/zero_point"))
    inputs = [f"{prefix}/scale", f"{prefix}/zero_point"]
    return [helper.make_node("QuantizeLinear", [tensor, *inputs], [f"{prefix}/q"], name=f"{prefix}/q"),
            helper.make_node("DequantizeLinear", [f"{prefix}/q", *inputs], [f"{prefix}/dq"], name=f"{prefix}/dq")]


def _weight_dq(graph, inits: dict, name: str, w: np.ndarray, kind: str, report: dict):
    """``w`` (K, N) stored as fp8 / int8 with one scale per output channel, and its DequantizeLinear(axis=1)."""
    from onnx import helper, numpy_helper

    amax = np.abs(w).max(axis=0)  # (N,)
    scale = np.where(amax > 0, amax / (E4M3_MAX if kind == "fp8" else INT8_MAX), 1.0).astype(np.float32)
    prefix = f"{name}/weight"
    _add(graph, inits, numpy_helper.from_array(_cast(w / scale, kind), f"{prefix}_{kind}"))
    _add(graph, inits, numpy_helper.from_array(scale, f"{prefix}_scale"))
    report["weight_bytes_before"] += 4 * w.size
    report["weight_bytes_after"] += w.size + 4 * scale.size
    return helper.make_node("DequantizeLinear", [f"{prefix}_{kind}", f"{prefix}_scale"], [f"{prefix}_dq"],
                            name=f"{prefix}_dq", axis=1)


def _add(graph, inits: dict, tensor) -> None:
    graph.initializer.append(tensor)
    inits[tensor.name] = tensor
