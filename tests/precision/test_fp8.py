"""fp8 (e4m3) and SmoothQuant INT8 (W8A8) Q/DQ graphs: the structure TensorRT parses, ONNX Runtime CPU
executing the rounding exactly as a NumPy (ml_dtypes) emulation does, on two families, and quality on
tiny-code's held-out text."""

from __future__ import annotations

import collections

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.export.presets import TRAINED
from edgekit.precision.calibrate import (
    AMAX,
    _open,
    _Scorer,
    calibration_windows,
    compare_graphs,
    matmul_input_stats,
)
from edgekit.precision.fp8 import quantize_fp8, quantize_w8a8
from edgekit.types import ExportedGraph

HELDOUT = TRAINED["tiny-code"] / "heldout.txt"
CALIBRATION = TRAINED["tiny-code"] / "calibration.txt"


def _e4m3(values: np.ndarray) -> np.ndarray:
    """Reference rounding: ml_dtypes' float8_e4m3fn (nearest even), saturated at ±448, back to float32."""
    return np.clip(values, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


def _assert_tensorrt_form(proto, head: str, dtype: int = TensorProto.FLOAT8E4M3FN) -> dict:
    """Weights ``dtype`` (K, N) → DequantizeLinear(axis=1, scale (N,) > 0, no zero point); activations
    QuantizeLinear → DequantizeLinear with one scalar scale > 0 and a ``dtype`` zero point of 0.
    Returns activation tensor -> the MatMuls reading its Q/DQ."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    readers = collections.defaultdict(list)
    for node in (n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in producer):
        wdq = producer[node.input[1]]
        if wdq.op_type != "DequantizeLinear":
            continue
        weight, scale = inits[wdq.input[0]], inits[wdq.input[1]]
        assert len(wdq.input) == 2 and {a.name: a.i for a in wdq.attribute} == {"axis": 1}, wdq
        assert weight.data_type == dtype and tuple(scale.dims) == (weight.dims[1],)
        assert (numpy_helper.to_array(scale) > 0).all()
        xdq = producer[node.input[0]]
        xq = producer[xdq.input[0]]
        assert (xdq.op_type, xq.op_type) == ("DequantizeLinear", "QuantizeLinear")
        assert xq.input[1:] == xdq.input[1:] and len(xq.input) == 3  # same scale and zero point
        scale, zero = inits[xq.input[1]], inits[xq.input[2]]
        assert tuple(scale.dims) == () and numpy_helper.to_array(scale) > 0
        assert zero.data_type == dtype and float(numpy_helper.to_array(zero).astype(np.float32)) == 0
        readers[xq.input[0]].append(node.name)
    assert head not in [name for names in readers.values() for name in names]
    return readers


@pytest.mark.parametrize(("architecture", "target"), [("Qwen3ForCausalLM", "portable"), ("Qwen3_5ForCausalLM", "decomposed")])
def test_fp8_graph_is_tensorrt_form_and_runs_on_cpu(exported, architecture, target):
    graph = ExportedGraph.load(exported(architecture, target))
    proto = onnx.load(str(graph.model_path))
    stats = matmul_input_stats(proto, graph, calibration_windows(graph, CALIBRATION, window=64, samples=2))
    report = quantize_fp8(proto, stats)
    readers = _assert_tensorrt_form(proto, report["lm_head_node"])
    assert sorted(n for names in readers.values() for n in names) == sorted(report["quantized_matmuls"]) != []
    assert any(len(names) >= 2 for names in readers.values())  # one Q/DQ for every MatMul reading a tensor
    assert report["weight_bytes_after"] < report["weight_bytes_before"] * 0.3
    onnx.checker.check_model(proto)
    ids = list(range(3, 30))
    got, want, fp32 = (_Scorer(_open(m), graph).forward(ids) for m in (proto, _weights_dequantized(proto), graph.model_path))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.isfinite(got).all() and np.abs(got - fp32).max() > 0  # (random tiny weights: no quality to speak of)


def _weights_dequantized(proto):
    """``proto`` with each weight's DequantizeLinear replaced by NumPy's e4m3 → float32 times its per-channel
    scale (the activation Q/DQ stay): checks the weights' axis and scale layout as ORT reads them."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    inits = {t.name: t for t in ref.graph.initializer}
    keep = []
    for node in ref.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            q = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)  # (K, N)
            ref.graph.initializer.append(numpy_helper.from_array(q * numpy_helper.to_array(inits[node.input[1]]),
                                                                 node.output[0]))
        else:
            keep.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(keep)
    return ref


def test_ort_cpu_executes_fp8_rounding_as_numpy_emulates_it():
    """One MatMul quantized by quantize_fp8, run by ORT CPU, equals the e4m3 emulation in NumPy (what TensorRT
    computes up to its fp32 accumulation order), and differs from the fp32 product."""
    rng = np.random.default_rng(0)
    k, n = 96, 40
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 1, n)).astype(np.float32)  # channels of unlike ranges
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    calib, x = rng.standard_normal((64, k)).astype(np.float32), 1.3 * rng.standard_normal((16, k)).astype(np.float32)
    stats = {"mm": np.concatenate([np.abs(calib).mean(0)[None], np.abs(calib).max(0)[None], calib])}
    quantize_fp8(proto, stats, lm_head=True)
    got = _open(proto).run(["logits"], {"x": x})[0]
    sx = np.abs(calib).max() / 448
    sw = np.abs(w).max(0) / 448  # (N,)
    want = (_e4m3(x / sx) * sx) @ (_e4m3(w / sw) * sw)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    assert np.abs(x).max() > np.abs(calib).max()  # some inputs beyond the calibrated range: saturated, as emulated
    assert np.abs(got - x @ w).max() > 1e-3 * np.abs(want).max()


def test_fp8_quality_on_tiny_code(tiny_code_portable, tiny_code_stats):
    graph = ExportedGraph.load(tiny_code_portable)
    proto = onnx.load(str(graph.model_path))
    report = quantize_fp8(proto, tiny_code_stats)
    assert len(report["quantized_matmuls"]) == 4 * 7  # every projection; the LM head left as it is
    assert len(report["activation_scales"]) == 4 * 4  # qkv, o, gate/up, down inputs per layer
    fp32 = onnx.load(str(graph.model_path), load_external_data=False)
    reads = {n.input[0]: n.name for n in fp32.graph.node if n.name in report["quantized_matmuls"]}
    for tensor, scale in report["activation_scales"].items():  # per tensor: the calibration amax / 448
        assert scale == pytest.approx(float(tiny_code_stats[reads[tensor]][AMAX].max()) / 448)
    quality = compare_graphs(graph.model_path, proto, graph, HELDOUT)
    assert quality.windows == 3 and quality.tokens > 2000  # the whole text
    assert quality.perplexity <= quality.reference_perplexity * 1.01, quality
    assert quality.top1_agreement >= 0.95, quality


def test_fp8_without_statistics_is_refused(tiny_code_portable, capsys):
    from edgekit.cli._output import print_error

    proto = onnx.load(str(ExportedGraph.load(tiny_code_portable).model_path))
    with pytest.raises(EdgekitError) as caught:
        quantize_fp8(proto, {})
    print_error(caught.value)
    err = capsys.readouterr().err
    assert "error: fp8 needs calibration statistics for every MatMul; 28 have none" in err and "hint: " in err


def test_w8a8_graph_is_tensorrt_int8_form_with_smoothing(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "portable"))
    proto = onnx.load(str(graph.model_path))
    stats = matmul_input_stats(proto, graph, calibration_windows(graph, CALIBRATION, window=64, samples=2))
    matmuls = len(stats)  # every constant-weight MatMul, the LM head among them
    report = quantize_w8a8(proto, stats)
    readers = _assert_tensorrt_form(proto, report["lm_head_node"], TensorProto.INT8)
    producer = {o: n for n in proto.graph.node for o in n.output}
    smoothing = [producer[tensor] for tensor in readers]
    assert all(m.op_type == "Mul" and m.name.endswith("/smooth/mul") for m in smoothing)
    assert report["smooth_alpha"] == 0.5 and len(report["quantized_matmuls"]) == matmuls - 1
    weights = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer if t.data_type == TensorProto.INT8}
    assert all(np.abs(w.astype(int)).max() <= 127 for w in weights.values())  # symmetric: -128 unused
    ids = list(range(3, 30))
    got = _Scorer(_open(proto), graph).forward(ids)
    assert np.isfinite(got).all()


def test_ort_cpu_executes_w8a8_as_numpy_emulates_it():
    """One smoothed INT8 MatMul, run by ORT CPU with its Q/DQ as written (its fused integer kernel saturates
    on AVX2: see compare_graphs), equals NumPy's emulation."""
    rng = np.random.default_rng(1)
    k, n = 64, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["logits"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [None, n])],
                              [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    calib = (rng.standard_normal((64, k)) * rng.uniform(0.1, 8, k)).astype(np.float32)  # outlier channels
    x = calib[:16] * 0.9
    stats = {"mm": np.concatenate([np.abs(calib).mean(0)[None], np.abs(calib).max(0)[None], calib])}
    quantize_w8a8(proto, stats, lm_head=True)
    got = _open(proto, exact_qdq=True).run(["logits"], {"x": x})[0]
    amax_x = np.abs(calib).max(0).astype(np.float64)
    s = (np.sqrt(amax_x) / np.sqrt(np.abs(w).max(1))).astype(np.float32)  # alpha 0.5
    xs, ws = x * (1 / s).astype(np.float32), w * s[:, None]
    sx = np.float32((amax_x / s).max() / 127)
    sw = (np.abs(ws).max(0) / 127).astype(np.float32)
    want = (np.clip(np.rint(xs / sx), -128, 127) * sx) @ (np.clip(np.rint(ws / sw), -127, 127) * sw)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert np.abs(got - x @ w).max() > 1e-4 * np.abs(want).max()


def test_w8a8_quality_on_tiny_code(tiny_code_portable, tiny_code_stats):
    graph = ExportedGraph.load(tiny_code_portable)
    proto = onnx.load(str(graph.model_path))
    quantize_w8a8(proto, tiny_code_stats)
    quality = compare_graphs(graph.model_path, proto, graph, HELDOUT)
    assert quality.perplexity <= quality.reference_perplexity * 1.03, quality
    assert quality.top1_agreement >= 0.95, quality
