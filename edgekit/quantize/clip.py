"""int4 round-to-nearest with a clipped range per block, in MatMulNBits' layout.

Plain RTN maps each block's [min, max] onto the 16 levels; one outlier then stretches the step for
the whole block. Shrinking the range by r in 1.00 .. 0.70 (per block, the r of least squared
weight error, outliers clamped) is the data-free search llama.cpp's quantizers and edgekit's GPU
weight-only pass make. Measured on tiny-code's held-out text (KL against fp32, block 32 / 128):
plain 0.0034 / 0.0053, searched 0.0030 / 0.0040.

The output is what ONNX Runtime's ``quantize_matmul_4bits`` kernel writes, so it drops in where
that kernel's output goes: for a (K, N) weight, ``packed`` (N, K / block, block / 2) uint8 (low
nibble first), ``scales`` (N, K / block), ``zero_points`` (N, ceil(K / block / 2)) uint8 (two
blocks per byte, low nibble first). K is zero-padded to whole blocks, as the kernel does.

Symmetric (``symmetric=True``, llama.cpp's Q4_0 form): no zero points, a level q means
(q - 8) * scale, and the scale is searched the same way: the block's largest-magnitude weight
times r maps onto level 0 (-8), as ONNX Runtime's symmetric RTN maps it. MatMulNBits' int8 kernel
skips the zero-point term then: decode 7-16% faster on the 0.6B shape (benchmarks/NOTES.md).
"""

from __future__ import annotations

import numpy as np

RATIOS = np.linspace(1.0, 0.7, 16, dtype=np.float32)  # 0.02 apart
LEVELS = 15  # 4 bits: 0 .. 15
CHUNK_VALUES = 1 << 22  # weights searched at once: a few 16 MB temporaries


def quantize_int4(weight: np.ndarray, block: int,
                  symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed, scales, zero points) of the (K, N) float ``weight``, blocks of ``block`` along K.

    Symmetric: the zero points are None (MatMulNBits' default, 8)."""
    k, n = weight.shape
    blocks = -(-k // block)
    packed = np.empty((n, blocks, block // 2), dtype=np.uint8)
    scales = np.empty((n, blocks), dtype=np.float32)
    zeros = np.full((n, blocks + blocks % 2), 8, dtype=np.uint8)  # an odd count's spare nibble: 8, as ORT writes
    step = max(1, CHUNK_VALUES // (blocks * block))
    search = _search_symmetric if symmetric else _search
    for start in range(0, n, step):
        stop = min(n, start + step)
        columns = np.asarray(weight[:, start:stop], dtype=np.float32).T  # (cols, K)
        if blocks * block != k:
            columns = np.pad(columns, ((0, 0), (0, blocks * block - k)))
        q, scales[start:stop], zeros[start:stop, :blocks] = search(columns.reshape(stop - start, blocks, block))
        packed[start:stop] = q[..., 0::2] | (q[..., 1::2] << 4)
    return packed, scales, None if symmetric else zeros[:, 0::2] | (zeros[:, 1::2] << 4)


def _search(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of ``x`` (rows, blocks, block): levels, scale, zero point of least squared error."""
    # The range always holds 0 (as ONNX Runtime's RTN): zero weights stay exact.
    low, high = np.minimum(x.min(-1), 0), np.maximum(x.max(-1), 0)
    best_err = np.full(low.shape, np.inf, dtype=np.float32)
    best_q = np.zeros(x.shape, dtype=np.uint8)
    best_s = np.ones(low.shape, dtype=np.float32)
    best_z = np.zeros(low.shape, dtype=np.uint8)
    for ratio in RATIOS:
        scale = (high - low) * ratio / LEVELS
        scale = np.where(scale > 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale is exact
        zero = np.clip(np.round(-low * ratio / scale), 0, LEVELS)
        q = np.clip(np.round(x / scale[..., None]) + zero[..., None], 0, LEVELS)
        err = np.square((q - zero[..., None]) * scale[..., None] - x).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], q.astype(np.uint8), best_q)
        best_s = np.where(better, scale, best_s)
        best_z = np.where(better, zero.astype(np.uint8), best_z)
    return best_q, best_s, best_z


def _search_symmetric(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block of ``x``: levels and scale of least squared error, zero point 8 (``_search``'s contract)."""
    # The signed weight of largest magnitude: it takes level 0 (-8 x scale), the one level with no mirror.
    peak = np.take_along_axis(x, np.abs(x).argmax(-1)[..., None], -1)[..., 0]
    best_err = np.full(peak.shape, np.inf, dtype=np.float32)
    best_q = np.full(x.shape, 8, dtype=np.uint8)
    best_s = np.ones(peak.shape, dtype=np.float32)
    for ratio in RATIOS:
        scale = (peak * ratio / -8).astype(np.float32)
        scale = np.where(scale != 0, scale, 1.0).astype(np.float32)  # an all-zero block: any scale is exact
        q = np.clip(np.round(x / scale[..., None]), -8, 7)
        err = np.square(q * scale[..., None] - x).sum(-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_q = np.where(better[..., None], (q + 8).astype(np.uint8), best_q)
        best_s = np.where(better, scale, best_s)
    return best_q, best_s, np.full(peak.shape, 8, dtype=np.uint8)
