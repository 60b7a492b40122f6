"""int4 / int8 weight-only graphs: the Q/DQ structure TensorRT parses, ONNX Runtime CPU running (and fusing)
them, their numerics against a NumPy dequantization on three families, and quality on tiny-code's held-out text."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper

from edgekit.errors import EdgekitError
from edgekit.export.presets import TRAINED
from edgekit.precision.calibrate import _open, compare_graphs
from edgekit.precision.weight_only import WeightOnlySettings, quantize_weight_only
from edgekit.types import ExportedGraph

HELDOUT = TRAINED["tiny-code"] / "heldout.txt"
FAMILIES = [("Qwen3ForCausalLM", "portable"), ("LlamaForCausalLM", "portable"), ("Qwen3_5ForCausalLM", "decomposed")]
QTYPE = {4: TensorProto.INT4, 8: TensorProto.INT8}


def _constant_matmuls(proto) -> dict[str, tuple[int, int]]:
    """MatMul node name -> (K, N) of its 2-D float initializer weight."""
    shapes = {t.name: tuple(t.dims) for t in proto.graph.initializer
              if len(t.dims) == 2 and t.data_type == TensorProto.FLOAT}
    return {n.name: shapes[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in shapes}


def _assert_tensorrt_form(proto, matmuls: dict, bits: int, block: int) -> None:
    """Each MatMul reads INT4/INT8 (K, N) → DequantizeLinear(axis=0: blocks along K, block_size, no zero
    point) with float32 scales (ceil(K / block), N), all > 0."""
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    nodes = {n.name: n for n in proto.graph.node}
    for name, (k, n) in matmuls.items():
        dq = producer[nodes[name].input[1]]
        attrs = {a.name: a.i for a in dq.attribute}
        assert dq.op_type == "DequantizeLinear" and len(dq.input) == 2, (name, dq)  # no zero point
        assert attrs == {"axis": 0, "block_size": block}, (name, attrs)
        weight, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert weight.data_type == QTYPE[bits] and tuple(weight.dims) == (k, n), (name, weight.dims)
        assert scale.data_type == TensorProto.FLOAT and tuple(scale.dims) == (-(-k // block), n), (name, scale.dims)
        assert (numpy_helper.to_array(scale) > 0).all(), name  # TensorRT asserts positive scales


def _dequantized(proto):
    """The quantized graph with each DequantizeLinear of an initializer replaced by NumPy's dequantization."""
    ref = onnx.ModelProto()
    ref.CopyFrom(proto)
    inits = {t.name: t for t in ref.graph.initializer}
    keep = []
    for node in ref.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[1] in inits:
            q, scale = (numpy_helper.to_array(inits[i]).astype(np.float32) for i in node.input[:2])
            attrs = {a.name: a.i for a in node.attribute}
            full = np.repeat(scale, attrs["block_size"], axis=attrs["axis"])  # one scale per weight
            full = full[:q.shape[0]] if attrs["axis"] == 0 else full[:, :q.shape[1]]
            ref.graph.initializer.append(numpy_helper.from_array(q * full, node.output[0]))
        else:
            keep.append(node)
    del ref.graph.node[:]
    ref.graph.node.extend(keep)
    return ref


def _logits(model, graph: ExportedGraph, ids) -> np.ndarray:
    from edgekit.precision.calibrate import _Scorer

    return _Scorer(_open(model, accuracy_level=0), graph).forward(ids)


def _fused_ops(proto, tmp_path) -> collections.Counter:
    """Op types of the graph ONNX Runtime CPU actually runs (its optimized-model dump)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3  # the dump warns that it is hardware specific
    ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)


@pytest.mark.parametrize(("architecture", "target"), FAMILIES)
def test_int4_graph_is_tensorrt_form_fuses_and_matches_numpy(exported, architecture, target, tmp_path):
    graph = ExportedGraph.load(exported(architecture, target))
    proto = onnx.load(str(graph.model_path))
    matmuls = _constant_matmuls(proto)
    report = quantize_weight_only(proto, WeightOnlySettings())
    assert sorted(report["quantized_matmuls"]) == sorted(matmuls) and report["lm_head_node"] in matmuls
    _assert_tensorrt_form(proto, matmuls, 4, 128)
    assert not _constant_matmuls(proto)  # no fp32 MatMul weight left, nor its bytes
    assert report["weight_bytes_after"] < report["weight_bytes_before"] * 0.2
    onnx.checker.check_model(proto)
    ops = _fused_ops(proto, tmp_path)
    assert ops["MatMulNBits"] == len(matmuls) and ops["DequantizeLinear"] == 0, ops
    ids = list(range(3, 40))
    got, want = _logits(proto, graph, ids), _logits(_dequantized(proto), graph, ids)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert np.abs(got - _logits(graph.model_path, graph, ids)).max() > 0  # the weights did change (random
    # tiny weights say nothing of int4's quality: that is measured on the trained tiny-code below)


def test_int4_weights_are_rounded_to_their_block_scale(exported):
    """Against the fp32 weights: every weight within half a step of its value, or clipped at ±7 steps."""
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "portable"))
    proto = onnx.load(str(graph.model_path))
    fp32 = {n.name: numpy_helper.to_array(t) for n in proto.graph.node for t in proto.graph.initializer
            if n.op_type == "MatMul" and t.name == n.input[1] and len(t.dims) == 2}
    quantize_weight_only(proto, WeightOnlySettings(block_size=32))
    ref = {t.name: numpy_helper.to_array(t) for t in _dequantized(proto).graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    for node in (n for n in proto.graph.node if n.name in fp32):
        dq = producer[node.input[1]]
        w, got, q = fp32[node.name], ref[dq.output[0]], inits[dq.input[0]].astype(int)
        step = np.repeat(inits[dq.input[1]], 32, axis=0)[:w.shape[0]]
        inside = np.abs(q) < 7
        assert (np.abs(got - w)[inside] <= step[inside] * 0.5001).all(), node.name
        assert (np.abs(w)[~inside] >= np.abs(got)[~inside] - step[~inside] * 0.5001).all(), node.name
        assert np.sqrt(np.square(got - w).mean() / np.square(w).mean()) < 0.15, node.name


def test_int8_graph_fuses_and_matches_numpy(exported, tmp_path):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "portable"))
    proto = onnx.load(str(graph.model_path))
    matmuls = _constant_matmuls(proto)
    quantize_weight_only(proto, WeightOnlySettings(bits=8, block_size=64))
    _assert_tensorrt_form(proto, matmuls, 8, 64)
    ops = _fused_ops(proto, tmp_path)
    assert ops["MatMulNBits"] == len(matmuls) and ops["DequantizeLinear"] == 0, ops
    ids = list(range(5, 30))
    got, want, fp32 = _logits(proto, graph, ids), _logits(_dequantized(proto), graph, ids), _logits(graph.model_path, graph, ids)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
    assert 0 < np.abs(got - fp32).max() and np.corrcoef(got.ravel(), fp32.ravel())[0, 1] > 0.999  # int8: near fp32


def test_lm_head_and_embedding_flags(exported, tmp_path):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "portable"))
    proto = onnx.load(str(graph.model_path))
    report = quantize_weight_only(proto, WeightOnlySettings(lm_head=False, embeddings=True, block_size=32))
    head = next(n for n in proto.graph.node if n.name == report["lm_head_node"])
    inits = {t.name: t for t in proto.graph.initializer}
    assert inits[head.input[1]].data_type == TensorProto.FLOAT  # left in fp32
    assert head.name not in report["quantized_matmuls"] and len(report["quantized_gathers"]) == 1
    gather = next(n for n in proto.graph.node if n.op_type == "Gather" and n.input[1] == "input_ids")
    dq = next(n for n in proto.graph.node if gather.input[0] in n.output)
    table, scale = inits[dq.input[0]], inits[dq.input[1]]
    vocab, hidden = graph.model.vocab_size, graph.model.hidden_size
    assert dq.op_type == "DequantizeLinear" and len(dq.input) == 2
    assert {a.name: a.i for a in dq.attribute} == {"axis": 1, "block_size": 32}  # blocks along hidden
    assert table.data_type == TensorProto.INT4 and tuple(table.dims) == (vocab, hidden)
    assert tuple(scale.dims) == (vocab, -(-hidden // 32))
    ids = list(range(3, 20))
    np.testing.assert_allclose(_logits(proto, graph, ids), _logits(_dequantized(proto), graph, ids), rtol=1e-3, atol=1e-3)


def test_bad_settings_are_refused_as_printed(capsys):
    from edgekit.cli._output import print_error

    for bad, words in [({"bits": 3}, "bits must be 4 or 8, got 3"), ({"method": "gptq"}, "'gptq'"),
                       ({"block_size": 100}, "power of two >= 16, got 100")]:
        with pytest.raises(EdgekitError) as caught:
            WeightOnlySettings(**bad)
        print_error(caught.value)
        err = capsys.readouterr().err
        assert "error: " in err and words in err and "hint: " in err, err


def test_awq_without_calibration_is_refused(tiny_code_portable, capsys):
    from edgekit.cli._output import print_error

    proto = onnx.load(str(ExportedGraph.load(tiny_code_portable).model_path))
    with pytest.raises(EdgekitError) as caught:
        quantize_weight_only(proto, WeightOnlySettings(method="awq"))
    print_error(caught.value)
    assert "error: AWQ needs calibration" in capsys.readouterr().err


def test_calibration_stats_layout(tiny_code_portable, tiny_code_stats):
    from edgekit.precision.calibrate import AMAX, MEAN_ABS, SAMPLES

    proto = onnx.load(str(ExportedGraph.load(tiny_code_portable).model_path), load_external_data=False)
    matmuls = _constant_matmuls(proto)
    assert set(tiny_code_stats) == set(matmuls)
    nodes = {n.name: n for n in proto.graph.node}
    for name, (k, _) in matmuls.items():
        value = tiny_code_stats[name]
        assert value.shape[1] == k and 2 < value.shape[0] <= 2 + 512
        assert (value[AMAX] >= value[MEAN_ABS]).all() and (value[MEAN_ABS] > 0).all()
        assert (np.abs(value[SAMPLES]) <= value[AMAX]).all()
    readers = collections.defaultdict(list)
    for name in matmuls:
        readers[nodes[name].input[0]].append(name)
    assert sorted(len(r) for r in readers.values()).count(3) == 4  # q, k, v of each layer read one norm output
    assert all(tiny_code_stats[r[0]] is tiny_code_stats[other] for r in readers.values() for other in r)


def test_calibration_text_errors_are_printed(tiny_code_portable, tmp_path, capsys):
    from edgekit.cli._output import print_error
    from edgekit.precision.calibrate import calibration_windows

    graph = ExportedGraph.load(tiny_code_portable)
    short = tmp_path / "short.txt"
    short.write_text("def f():\n    return 1\n")
    for path, words in [(tmp_path / "missing.txt", "no such file"), (short, "under one window of 128")]:
        with pytest.raises(EdgekitError) as caught:
            calibration_windows(graph, path)
        print_error(caught.value)
        err = capsys.readouterr().err
        assert words in err and "hint: " in err, err


@pytest.fixture(scope="module")
def tiny_code_quality(tiny_code_portable, tiny_code_stats):
    """factory(**settings) -> (QualityReport against fp32 on the whole held-out text, quantize report); cached."""
    graph, made = ExportedGraph.load(tiny_code_portable), {}

    def measure(**settings):
        key = tuple(sorted(settings.items()))
        if key not in made:
            proto = onnx.load(str(graph.model_path))
            report = quantize_weight_only(proto, WeightOnlySettings(**settings), stats=tiny_code_stats)
            made[key] = (compare_graphs(graph.model_path, proto, graph, HELDOUT), report, proto)
        return made[key]

    return measure


def test_int4_rtn_block_128_quality(tiny_code_quality, tiny_code_portable):
    quality, _, _ = tiny_code_quality(bits=4, block_size=128, method="rtn")
    assert quality.windows == 3 and quality.tokens > 2000  # the whole text, in windows of the model's 1024 positions
    assert quality.perplexity <= quality.reference_perplexity * 1.03, quality
    assert quality.top1_agreement >= 0.90, quality
    assert quality.reference_perplexity < 500  # the trained preset (untrained weights score ~2048)


def test_awq_at_least_as_good_as_rtn(tiny_code_quality):
    rtn, _, _ = tiny_code_quality(bits=4, block_size=128, method="rtn")
    awq, report, proto = tiny_code_quality(bits=4, block_size=128, method="awq")
    assert awq.perplexity <= rtn.perplexity and awq.kl_divergence <= rtn.kl_divergence, (awq, rtn)
    assert awq.top1_agreement >= 0.90, awq
    scaled = [name for name, alpha in report["awq_alphas"].items() if alpha > 0]
    assert scaled and len(report["awq_alphas"]) == len(report["quantized_matmuls"])
    muls = {n.output[0]: n for n in proto.graph.node if n.op_type == "Mul" and n.name.endswith("/awq_mul")}
    matmuls = {n.name: n for n in proto.graph.node if n.op_type == "MatMul"}
    assert len(muls) == len(scaled) and all(matmuls[name].input[0] in muls for name in scaled)


def test_broken_scales_are_caught(tiny_code_quality, tiny_code_portable):
    """Doubling one MLP down projection's scales must show in the figures, so the quality test can fail."""
    graph = ExportedGraph.load(tiny_code_portable)
    good, _, proto = tiny_code_quality(bits=4, block_size=128, method="rtn")
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    dq = next(n for n in broken.graph.node if n.name == "node_linear_6/weight_dq")  # layer 0 down_proj
    scale = next(t for t in broken.graph.initializer if t.name == dq.input[1])
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 2, scale.name))
    bad = compare_graphs(graph.model_path, broken, graph, HELDOUT)
    assert not bad.passed and bad.top1_agreement < 0.85 and bad.kl_divergence > 5 * good.kl_divergence, bad
