"""The clip-searched int4 quantizer: ONNX Runtime's MatMulNBits layout, and never a worse block than plain RTN."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.quantize import clip


def _ort_rtn(weight: np.ndarray, block: int, symmetric: bool = False):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    k, n = weight.shape
    blocks = -(-k // block)
    packed = np.zeros((n, blocks, block // 2), dtype=np.uint8)
    scales = np.zeros((n, blocks), dtype=np.float32)
    zeros = np.zeros((n, -(-blocks // 2)), dtype=np.uint8)
    padded = np.ascontiguousarray(np.pad(weight, ((0, blocks * block - k), (0, 0))))
    quantize_matmul_4bits(packed, padded, scales, zeros, block, n, blocks * block, symmetric)
    return packed, scales, None if symmetric else zeros


def _dequantize(packed, scales, zeros, k: int) -> np.ndarray:
    """(K, N) weights back from MatMulNBits' layout (no zero points: MatMulNBits' default, 8)."""
    n, blocks, _ = packed.shape
    levels = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, blocks, -1).astype(np.float32)
    if zeros is None:
        points = np.full((n, blocks), 8, dtype=np.float32)
    else:
        points = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(n, -1)[:, :blocks].astype(np.float32)
    return ((levels - points[..., None]) * scales[..., None]).reshape(n, -1)[:, :k].T


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("k, block", [(256, 32), (200, 32), (384, 128)])  # 200: a padded last block
def test_unclipped_matches_onnxruntime_rtn(monkeypatch, k, block, symmetric):
    """With the range search off (ratio 1 only) the output is ORT's own RTN: the same layout and numbers."""
    weight = np.random.default_rng(k).standard_normal((k, 48)).astype(np.float32)
    monkeypatch.setattr(clip, "RATIOS", np.array([1.0], dtype=np.float32))
    ours, theirs = clip.quantize_int4(weight, block, symmetric), _ort_rtn(weight, block, symmetric)
    np.testing.assert_allclose(ours[1], theirs[1], rtol=1e-6)
    np.testing.assert_allclose(_dequantize(*ours, k), _dequantize(*theirs, k), atol=1e-5)
    assert np.mean(ours[0] == theirs[0]) > 0.999  # rounding ties may differ
    assert ours[2] is None if symmetric else np.array_equal(ours[2], theirs[2])


@pytest.mark.parametrize("symmetric", [False, True])
def test_search_lowers_error_and_never_raises_it_for_a_block(symmetric):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((512, 64)).astype(np.float32)
    weight[rng.integers(0, 512, 40), rng.integers(0, 64, 40)] *= 8  # outliers: where clipping pays
    block = 64
    searched = _dequantize(*clip.quantize_int4(weight, block, symmetric), 512) - weight
    plain = _dequantize(*_ort_rtn(weight, block, symmetric), 512) - weight
    per_block = lambda err: np.square(err).reshape(512 // block, block, 64).sum(1)  # noqa: E731
    assert np.all(per_block(searched) <= per_block(plain) * (1 + 1e-5))
    assert np.square(searched).sum() < 0.95 * np.square(plain).sum()


@pytest.mark.parametrize("symmetric", [False, True])
def test_zero_blocks_stay_exact(symmetric):
    weight = np.zeros((64, 8), dtype=np.float32)
    weight[:, 0] = np.linspace(-1, 1, 64)
    back = _dequantize(*clip.quantize_int4(weight, 32, symmetric), 64)
    assert np.all(back[:, 1:] == 0) and np.abs(back[:, 0] - weight[:, 0]).max() < 0.1
