"""Weight-only INT4 / INT8 quantization in the Q/DQ form TensorRT's ONNX parser takes: RTN and AWQ.

    x (.., K) ──────────────────────────────────────────────────────────────┐
    W (K, N) fp32 ─quantize→ Wq (K, N) INT4 | INT8 ──┐                      MatMul → y (.., N)
                             scale (ceil(K/B), N) ───┴─DequantizeLinear(axis=0, block_size=B)─┘

    AWQ: x ─Mul(1/s) (K,)→ MatMul(DequantizeLinear(quantize(diag(s) · W)))   s = mean|x|^alpha, per input channel

Blocks run along K (axis 0 of the ONNX (K, N) weight, the reduction axis), as TensorRT (>= 10.0,
blocked INT4/INT8 DequantizeLinear) and ONNX Runtime's MatMulNBits expect. Symmetric, with no zero
point input (TensorRT takes a zero point of 0 or none). Scales are float32 (the fp16/bf16 pass,
which runs after this one, converts them) and strictly positive: TensorRT's ONNX parser asserts
"Scale coefficients must all be positive" (onnx/onnx-tensorrt QuantDequantLinearHelper), so
q lies in [-7, 7] (int4) or [-127, 127] (int8), the TensorRT / ModelOpt convention, with
scale = r · amax(block) / 7 (or / 127), r in 0.70 .. 1.00 chosen per block to minimize the block's
squared weight error (data-free clipping, as llama.cpp's quantizers do; on tiny-code int4 block 128
it lifts top-1 agreement from 0.900 with r = 1 to 0.925), and an all-zero block gets scale 1.
ONNX Runtime's CPU provider fuses
DequantizeLinear + MatMul into com.microsoft.MatMulNBits (its DQMatMulToMatMulNBits rewrite; 4 and
8 bits), computing in ``session.qdq_matmulnbits_accuracy_level`` (default 4, int8 activations;
0 keeps fp32 activations as a GPU's weight-only kernel does).

What was chosen, and why (checked with onnxruntime 1.32, onnx 1.23, December 2026):
* onnxruntime's MatMulNBitsQuantizer(quant_format=QDQ, is_symmetric=True) emits this form but only
  for 4 bits and RTN, and its scale is the block's *signed* max / -8: negative wherever the
  largest-magnitude weight of a block is positive, which TensorRT refuses.
* nvidia-modelopt 0.47 has an ONNX INT4 AWQ that falls back to NumPy without CUDA, but its
  ``onnx`` extra pins onnx~=1.21 and onnxruntime-gpu~=1.24 (this project runs onnx 1.23 and
  onnxruntime 1.32) and pulls cupy-cuda12x, polygraphy, onnx-graphsurgeon, lief and cppimport.
So the quantizer is written here in NumPy: one path for RTN and AWQ, 4 and 8 bits. AWQ per MatMul:
alpha on a grid 0, 0.1 .. 1 minimizing the output error on sampled calibration activations with
plain amax scales (as AWQ searches), then the clip-searched scales; if RTN (alpha 0) then does
better on those samples, alpha 0 is kept, so AWQ's sample error is never above RTN's. 1/s is a
Mul on the MatMul's input (not folded into the preceding norm: q, k and v take different s).

Embeddings (``embeddings=True``): the (vocab, hidden) table becomes INT4/INT8 → DequantizeLinear
(axis=1, blocks along hidden) → Gather. ModelOpt emits this form for TensorRT (gather_quantize_axis);
ONNX Runtime CPU runs it as a plain DequantizeLinear (the whole table each step), and whether
TensorRT 10.3 parses blocked DQ into Gather has not been checked on a device: off by default.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError

BITS = (4, 8)
METHODS = ("rtn", "awq")
ALPHAS = tuple(round(0.1 * i, 1) for i in range(11))  # AWQ's grid; 0 = RTN
CLIP_RATIOS = tuple(round(0.70 + 0.02 * i, 2) for i in range(16))  # scale = amax * r / qmax, r searched per block
COLUMN_CHUNK = 1024  # output channels quantized per thread


@dataclass(frozen=True)
class WeightOnlySettings:
    """What ``quantize_weight_only`` does, as data (recorded in the build plan)."""

    bits: int = 4  # 4 | 8
    block_size: int = 128  # weights per scale along the reduction (K) axis; TensorRT's default 128
    method: str = "rtn"  # "rtn" | "awq"
    lm_head: bool = True  # quantize the LM head (the MatMul producing logits) too
    embeddings: bool = False  # the embedding Gather too (INT table → DequantizeLinear(axis=1) → Gather)

    def __post_init__(self):
        if self.bits not in BITS:
            raise EdgekitError(f"weight-only bits must be 4 or 8, got {self.bits}", "use int4 or int8")
        if self.method not in METHODS:
            raise EdgekitError(f"weight-only method must be one of {', '.join(METHODS)}, got {self.method!r}",
                               "use rtn, or awq with a calibration text")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise EdgekitError(f"block size must be a power of two >= 16, got {self.block_size}",
                               "use 128 (TensorRT's default), 64 or 32")


def quantize_weight_only(proto, settings: WeightOnlySettings, stats: dict | None = None) -> dict[str, Any]:
    """IN PLACE on an fp32 graph: constant-weight MatMuls → INT4/INT8 initializer + float32 scale →
    DequantizeLinear(axis=0, block_size) → MatMul; with AWQ, a Mul by 1/s on each such MatMul's input.

    ``stats`` (AWQ only) is ``calibrate.matmul_input_stats``'s result. Returns a report: the
    quantized node names, weight bytes before and after, the method and, for AWQ, each node's alpha.
    """
    from edgekit.quantize import _lm_head

    if settings.method == "awq" and not stats:
        raise EdgekitError("AWQ needs calibration statistics of the fp32 graph",
                           "pass --calibration TEXTFILE (text like the model's use), or use rtn")
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    lm_head = _lm_head(proto)
    targets = [(i, n) for i, n in enumerate(graph.node)
               if _constant_weight(n, inits) and (settings.lm_head or n.name != lm_head)]
    missing = [n.name for _, n in targets if settings.method == "awq" and n.name not in stats]
    if missing:
        raise EdgekitError(f"AWQ needs calibration statistics for every MatMul; {len(missing)} have none "
                           f"(first: {missing[0]})", "compute them on this same fp32 graph (matmul_input_stats)")
    before: dict[int, list] = {}  # node index -> nodes to insert before it
    report = {"method": settings.method, "bits": settings.bits, "block_size": settings.block_size,
              "lm_head_node": lm_head, "quantized_matmuls": [], "quantized_gathers": [], "awq_alphas": {},
              "weight_bytes_before": 0, "weight_bytes_after": 0}
    for i, node in targets:
        before[i] = _quantize_matmul(graph, node, inits, settings, (stats or {}).get(node.name), report)
    gather = _embedding_index(proto) if settings.embeddings else None
    if gather is not None:
        before.setdefault(gather, []).extend(_quantize_gather(graph, graph.node[gather], inits, settings, report))
    insert_nodes(graph, before)
    drop_unused_initializers(graph)
    return report


def _embedding_index(proto) -> int | None:
    from onnx import TensorProto

    inits = {t.name: t for t in proto.graph.initializer}
    for i, node in enumerate(proto.graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is not None and len(table.dims) == 2 and table.data_type == TensorProto.FLOAT \
                and node.input[1] == "input_ids":
            return i
    return None


def _constant_weight(node, inits: dict) -> bool:
    """A MatMul whose B is a 2-D float32 initializer: (K, N) weights, not an attention product."""
    from onnx import TensorProto

    weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
    return weight is not None and len(weight.dims) == 2 and weight.data_type == TensorProto.FLOAT


def quantize_blocks(w: np.ndarray, bits: int, block: int, axis: int = 0,
                    search: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest of ``w`` (2-D) in blocks of ``block`` along ``axis``.

    Each block's scale is amax·r / qmax with r in ``CLIP_RATIOS`` minimizing the block's squared
    weight error (``search``; data-free, as llama.cpp's quantizers do), else r = 1. Returns (q int8
    values in [-qmax, qmax], qmax = 2^(bits-1) - 1, w's shape; scale float32 > 0, w's shape with
    ``axis`` shrunk to ceil(size / block)), so that w ≈ q * repeat(scale, block, axis).
    """
    moved = np.moveaxis(np.asarray(w, dtype=np.float32), axis, 0)  # (K, N): blocks along K
    chunks = range(0, moved.shape[1], COLUMN_CHUNK)
    if len(chunks) == 1:
        q, scale = _quantize_columns(moved, bits, block, search)
    else:  # NumPy's ufuncs release the GIL: column chunks quantize in parallel
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(min(len(chunks), os.cpu_count() or 1)) as pool:
            parts = list(pool.map(lambda j: _quantize_columns(moved[:, j:j + COLUMN_CHUNK], bits, block, search), chunks))
        q, scale = (np.concatenate(part, axis=1) for part in zip(*parts))
    return np.moveaxis(q, 0, axis), np.moveaxis(scale, 0, axis)


def _quantize_columns(w: np.ndarray, bits: int, block: int, search: bool) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_blocks`` of (K, N) ``w`` along K."""
    grouped, k = _grouped(w, block)  # (blocks, B, N)
    qmax = 2 ** (bits - 1) - 1
    amax = np.abs(grouped).max(axis=1)  # (blocks, N)
    amax = np.where(amax > 0, amax, qmax).astype(np.float32)  # an all-zero block: scale 1 (TensorRT refuses 0)
    best, best_error = amax / qmax, None
    for ratio in CLIP_RATIOS if search else ():
        scale = (amax * np.float32(ratio / qmax)).astype(np.float32)
        error = np.square(_fake_quant(grouped, scale, qmax) - grouped).sum(axis=1)  # (blocks, N)
        better = error < best_error if best_error is not None else np.ones(error.shape, bool)
        best = np.where(better, scale, best)
        best_error = np.where(better, error, best_error) if best_error is not None else error
    q = _rounded(grouped, best, qmax).reshape(-1, grouped.shape[2])[:k].astype(np.int8)
    return q, best


def _grouped(w: np.ndarray, block: int) -> tuple[np.ndarray, int]:
    """(K, N) → (ceil(K / block), block, N), zero-padded along K; and K."""
    k, n = w.shape
    blocks = -(-k // block)
    if blocks * block != k:
        w = np.concatenate([w, np.zeros((blocks * block - k, n), np.float32)])
    return w.reshape(blocks, block, n), k


def _rounded(grouped: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    q = grouped * (1 / scale)[:, None, :]
    np.rint(q, out=q)
    return np.clip(q, -qmax, qmax, out=q)


def _fake_quant(grouped: np.ndarray, scale: np.ndarray, qmax: int) -> np.ndarray:
    """Quantize-dequantize of the grouped (blocks, B, N) weights with (blocks, N) scales."""
    q = _rounded(grouped, scale, qmax)
    q *= scale[:, None, :]
    return q


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, block: int, axis: int = 0) -> np.ndarray:
    """What DequantizeLinear(axis, block_size) computes: q * scale repeated ``block`` times along ``axis``."""
    size = q.shape[axis]
    return q.astype(np.float32) * np.repeat(scale, block, axis=axis).take(range(size), axis=axis)


def awq_scales(w: np.ndarray, x: np.ndarray, mean_abs: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, float]:
    """AWQ's per-input-channel scale s (K,) for weight ``w`` (K, N) and its alpha.

    ``x`` (rows, K) are sampled activations of the MatMul's input, ``mean_abs`` (K,) mean |x| over
    all calibration tokens. s = mean_abs^alpha (normalized to geometric mean 1), alpha minimizing
    || x·w − (x / s)·fake_quant(diag(s)·w) ||² on the grid ``ALPHAS`` with plain amax scales (as AWQ
    searches); the chosen alpha is then compared with alpha 0 (RTN) under the final, clip-searched
    scales and loses to it if worse, so AWQ's error on the samples is never above RTN's.
    """
    want = x @ w  # (rows, N)
    qmax = 2 ** (bits - 1) - 1

    def error(s: np.ndarray, search: bool) -> float:
        grouped, k = _grouped(w * s[:, None], block)
        if search:
            q, scale = quantize_blocks(w * s[:, None], bits, block)
            approx = dequantize_blocks(q, scale, block)
        else:
            amax = np.abs(grouped).max(axis=1)
            approx = _fake_quant(grouped, np.where(amax > 0, amax / qmax, 1).astype(np.float32), qmax)
            approx = approx.reshape(-1, w.shape[1])[:k]
        return float(np.square((x / s) @ approx - want).mean())

    scales = {alpha: _awq_s(mean_abs, alpha) for alpha in ALPHAS}
    alpha = min(ALPHAS, key=lambda a: error(scales[a], search=False))
    if alpha and error(scales[alpha], search=True) >= error(scales[0.0], search=True):
        alpha = 0.0
    return scales[alpha], alpha


def _awq_s(mean_abs: np.ndarray, alpha: float) -> np.ndarray:
    s = np.maximum(mean_abs, 1e-8).astype(np.float64) ** alpha
    return (s / np.sqrt(s.max() * s.min())).astype(np.float32)  # geometric mean of the extremes 1, as AWQ does


def _quantize_matmul(graph, node, inits: dict, settings: WeightOnlySettings, stats, report: dict) -> list:
    """Rewire ``node`` to read its weight through a DequantizeLinear; returns the nodes to put before it."""
    from onnx import helper, numpy_helper

    from edgekit.precision.calibrate import MEAN_ABS, SAMPLES

    new = []
    w = numpy_helper.to_array(inits[node.input[1]])  # (K, N)
    if settings.method == "awq":
        s, alpha = awq_scales(w, stats[SAMPLES], stats[MEAN_ABS], settings.bits, settings.block_size)
        report["awq_alphas"][node.name] = alpha
        if alpha:
            w = w * s[:, None]
            inv = _add(graph, inits, numpy_helper.from_array((1 / s).astype(np.float32), f"{node.name}/awq_inv_scale"))
            scaled = f"{node.name}/awq_input"
            new.append(helper.make_node("Mul", [node.input[0], inv], [scaled], name=f"{node.name}/awq_mul"))
            node.input[0] = scaled
    q, scale = quantize_blocks(w, settings.bits, settings.block_size)
    new.append(_dequantize_node(graph, inits, node.name, q, scale, settings, axis=0))
    node.input[1] = new[-1].output[0]
    report["quantized_matmuls"].append(node.name)
    _count_bytes(report, w.size, q.size, scale.size, settings.bits)
    return new


def _quantize_gather(graph, node, inits: dict, settings: WeightOnlySettings, report: dict) -> list:
    from onnx import numpy_helper

    table = numpy_helper.to_array(inits[node.input[0]])  # (vocab, hidden): blocks along hidden
    q, scale = quantize_blocks(table, settings.bits, settings.block_size, axis=1)
    dq = _dequantize_node(graph, inits, node.name, q, scale, settings, axis=1)
    node.input[0] = dq.output[0]
    report["quantized_gathers"].append(node.name)
    _count_bytes(report, table.size, q.size, scale.size, settings.bits)
    return [dq]


def _dequantize_node(graph, inits: dict, name: str, q: np.ndarray, scale: np.ndarray,
                     settings: WeightOnlySettings, axis: int):
    """INT4/INT8 ``q`` and its scale as initializers, and the DequantizeLinear (no zero point) reading them."""
    import ml_dtypes
    from onnx import helper, numpy_helper

    values = q.astype(ml_dtypes.int4) if settings.bits == 4 else q  # onnx packs int4 two per byte
    weight = _add(graph, inits, numpy_helper.from_array(values, f"{name}/weight_int{settings.bits}"))
    scales = _add(graph, inits, numpy_helper.from_array(scale, f"{name}/weight_scale"))
    return helper.make_node("DequantizeLinear", [weight, scales], [f"{name}/weight_dq"], name=f"{name}/weight_dq",
                            axis=axis, block_size=settings.block_size)


def _add(graph, inits: dict, tensor) -> str:
    graph.initializer.append(tensor)
    inits[tensor.name] = tensor
    return tensor.name


def _count_bytes(report: dict, before: int, values: int, scales: int, bits: int) -> None:
    report["weight_bytes_before"] += 4 * before
    report["weight_bytes_after"] += -(-values * bits // 8) + 4 * scales


def insert_nodes(graph, before: dict[int, list]) -> None:
    """Put ``before[i]`` ahead of the graph's i-th node (keeps the order topological)."""
    from onnx import NodeProto

    nodes = []
    for i, node in enumerate(graph.node):
        nodes.extend(before.get(i, ()))
        nodes.append(NodeProto())
        nodes[-1].CopyFrom(node)  # copies: the repeated field is cleared below
    del graph.node[:]
    graph.node.extend(nodes)


def drop_unused_initializers(graph) -> None:
    """Remove the fp32 weights no node reads any more (one shared with another node, or read
    from a Loop/If body, stays)."""
    used = _names_read(graph) | {o.name for o in graph.output}
    keep = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)


def _names_read(graph) -> set[str]:
    from onnx import AttributeProto

    names = set()
    for node in graph.node:
        names.update(node.input)
        for attr in node.attribute:
            bodies = [attr.g] if attr.type == AttributeProto.GRAPH else list(attr.graphs)
            for body in bodies:
                names |= _names_read(body)
    return names
