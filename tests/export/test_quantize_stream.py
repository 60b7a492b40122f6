"""Quantizing at export (``edgekit export --quant``): the same int4 weights as ``edgekit build --quant
int4`` (clip-searched RTN; ORT's plain RTN past the size limit), the same bytes whatever the slice size,
and quality measured on the trained preset."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest

from edgekit.engines import QuantOptions, build_engine
from edgekit.export import export_model
from edgekit.export.presets import TRAINED
from edgekit.quality import measure_quality

PRESET = "tiny-code"
HELDOUT = TRAINED[PRESET] / "heldout.txt"


def _nbits_weights(model_path) -> set[tuple[str, ...]]:
    """Per MatMulNBits: digests of its packed weight, scales and zero points (names differ between paths)."""
    proto = onnx.load(str(model_path))
    arrays = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}

    def digest(name):
        return hashlib.sha256(np.ascontiguousarray(arrays[name]).tobytes()).hexdigest()

    return {tuple(digest(n) for n in node.input[1:4]) for node in proto.graph.node if node.op_type == "MatMulNBits"}


@pytest.fixture(scope="module")
def int4_export(tmp_path_factory):
    return export_model(PRESET, tmp_path_factory.mktemp("q") / "int4", quant="int4")


def test_export_int4_equals_build_int4(int4_export, tmp_path):
    fp32 = export_model(PRESET, tmp_path / "fp32")
    build_engine(fp32.path, "cpu-x86-64", tmp_path / "build", quant=QuantOptions(quantization="int4", method="rtn"))
    built = _nbits_weights(tmp_path / "build" / "model.onnx")
    streamed = _nbits_weights(int4_export.model_path)
    assert len(streamed) == int4_export.quantization["quantized_matmuls"] > 10
    assert streamed == built


def test_slices_do_not_change_the_bytes(int4_export, tmp_path, monkeypatch):
    """Weights are quantized by slices of columns (rows of the checkpoint tensor): any slice size, same bytes."""
    import edgekit.export.quantize as stream

    monkeypatch.setattr(stream, "CHUNK_BYTES", 4 * 64 * 7)  # 7 columns of a 64-row weight per slice
    sliced = export_model(PRESET, tmp_path / "sliced", quant="int4")
    assert (sliced.path / "model.onnx.data").read_bytes() == (int4_export.path / "model.onnx.data").read_bytes()


def test_past_the_search_limit_the_export_keeps_orts_plain_rtn(int4_export, tmp_path, monkeypatch):
    """A model too big for the clip search (here: a limit of 0 weights) gets ORT's own kernel, and says so;
    below the limit the export's ranges are searched, not ORT's (their error: tests/quantize/test_clip.py)."""
    import edgekit.export.quantize as stream
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    monkeypatch.setattr(stream, "SEARCH_LIMIT", 0)
    plain = export_model(PRESET, tmp_path / "plain", quant="int4")
    assert plain.quantization["clip_search"] is False and int4_export.quantization["clip_search"] is True
    fp32 = onnx.load(str(export_model(PRESET, tmp_path / "fp32").model_path))
    weight = next(onnx.numpy_helper.to_array(t) for t in fp32.graph.initializer
                  if t.name.endswith("layers.0.mlp.down_proj.weight.transpose"))  # (K, N)
    k, n = weight.shape
    packed, scales, zeros = (np.zeros((n, k // 32, 16), np.uint8), np.zeros((n, k // 32), np.float32),
                             np.zeros((n, -(-k // 64)), np.uint8))
    quantize_matmul_4bits(packed, np.ascontiguousarray(weight), scales, zeros, 32, n, k, False)
    digest = tuple(hashlib.sha256(a.tobytes()).hexdigest() for a in (packed, scales, zeros))
    assert digest in _nbits_weights(plain.model_path) and digest not in _nbits_weights(int4_export.model_path)


def test_export_int4_quality(int4_export):
    assert int4_export.quantization["quantized_gathers"] == 1  # the embedding too
    report = measure_quality(int4_export.path, PRESET, HELDOUT)
    assert report.perplexity <= report.reference_perplexity * 1.06, report
    assert report.top1_agreement >= 0.88 and report.passed, report


def test_symmetric_export_equals_the_symmetric_build_and_keeps_quality(tmp_path):
    """``--symmetric``: no zero points on MatMulNBits (the build's clip-searched numbers) nor on the
    embedding's GatherBlockQuantized (signed int4, as ORT's quantizer writes it)."""
    graph = export_model(PRESET, tmp_path / "sym", quant="int4", symmetric=True)
    assert graph.quantization["symmetric"] is True and graph.quantization["quantized_gathers"] == 1
    proto = onnx.load(str(graph.model_path), load_external_data=False)
    assert {len(n.input) for n in proto.graph.node if n.op_type in ("MatMulNBits", "GatherBlockQuantized")} == {3}
    fp32 = export_model(PRESET, tmp_path / "fp32")
    build_engine(fp32.path, "cpu-x86-64", tmp_path / "build",
                 quant=QuantOptions(quantization="int4", method="rtn", symmetric=True))
    assert _nbits_weights(graph.model_path) == _nbits_weights(tmp_path / "build" / "model.onnx")
    report = measure_quality(graph.path, PRESET, HELDOUT)
    assert report.perplexity <= report.reference_perplexity * 1.06, report
    assert report.top1_agreement >= 0.88 and report.passed, report


def test_symmetric_without_int4_is_refused_as_printed(tmp_path):
    from tests.cli.test_cli import edgekit

    result = edgekit("export", PRESET, "-o", str(tmp_path / "x"), "--quant", "int8", "--symmetric")
    assert result.returncode == 1 and result.stderr.splitlines()[-2:] == [
        "error: --symmetric applies with --quant int4", "hint: add --quant int4, or drop --symmetric"]
    assert not (tmp_path / "x").exists()


def test_export_int8_quality(tmp_path):
    graph = export_model(PRESET, tmp_path / "int8", quant="int8", block_size=64)
    assert "com.microsoft.MatMulNBits" in graph.ops and graph.quantization["block_size"] == 64
    report = measure_quality(graph.path, PRESET, HELDOUT)
    assert report.passed and report.top1_agreement >= 0.95, report


def test_bad_block_size_is_refused_before_any_work(tmp_path):
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="--block-size 48"):
        export_model(PRESET, tmp_path / "bad", quant="int4", block_size=48)
    assert not (tmp_path / "bad").exists() and not (tmp_path / ".bad.partial").exists()


def test_build_of_an_export_quantized_model(int4_export, tmp_path):
    """A CPU build keeps the export's int4 weights (no second quantization) and runs; --quant int4 is refused."""
    from edgekit.engines import BuildRefused, plan_build
    from edgekit.runtimes.registry import open_engine

    plan = plan_build(int4_export.path, "cpu-x86-64")
    assert plan.quantization == "none"
    build_engine(int4_export.path, "cpu-x86-64", tmp_path / "build")
    session = open_engine(tmp_path / "build")
    session.reset()
    built = session.forward(np.arange(5, 21))
    session = open_engine(int4_export.path)
    session.reset()
    np.testing.assert_allclose(built, session.forward(np.arange(5, 21)), atol=1e-3)
    with pytest.raises(BuildRefused, match="quantized to int4 at export"):
        plan_build(int4_export.path, "cpu-x86-64", quant=QuantOptions(quantization="int4"))
