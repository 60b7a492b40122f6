"""Build graph edits on small hand-made graphs, run by ONNX Runtime: same numbers, less work."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgekit.engines.graph_edits import KEEP_INPUT, edit_build  # noqa: E402

H, V, F = 8, 20, 12  # hidden, vocab, MLP width


def _model(tied: bool):
    """ids (1, S) -> Gather -> gate/up MatMuls -> Mul -> down MatMul -> LM head -> logits (1, S, V)."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((V, H)).astype(np.float32)
    head = table.T.copy() if tied else rng.standard_normal((H, V)).astype(np.float32)  # (H, V)
    inits = [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(head, "head"),
             *(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
               for name, shape in (("gate", (H, F)), ("up", (H, F)), ("down", (F, H))))]
    nodes = [helper.make_node("Gather", ["embed", "ids"], ["x"], name="embed"),
             helper.make_node("MatMul", ["x", "gate"], ["g"], name="gate"),
             helper.make_node("MatMul", ["x", "up"], ["u"], name="up"),
             helper.make_node("Mul", ["g", "u"], ["m"], name="mul"),
             helper.make_node("MatMul", ["m", "down"], ["h"], name="down"),
             helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head")]
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "S"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "S", V])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _run(proto, ids, keep=None):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feed = {"ids": ids} if keep is None else {"ids": ids, KEEP_INPUT: np.array([keep], dtype=np.int64)}
    return session.run(None, feed)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_edits_keep_the_numbers(tied):
    ids = np.array([[1, 4, 7, 2, 9]], dtype=np.int64)
    proto = _model(tied)
    want = _run(proto, ids)  # (1, 5, V)
    done = edit_build(proto)
    assert done == {"tied_lm_head": tied, "logits_to_keep": True}
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("MatMul") == (3 if tied else 4) and ops.count("FusedMatMul") == int(tied)
    assert ("head" in {t.name for t in proto.graph.initializer}) is not tied  # no second copy of the table
    np.testing.assert_allclose(_run(proto, ids, keep=0), want, rtol=1e-5, atol=1e-5)
    last = _run(proto, ids, keep=1)
    assert last.shape == (1, 1, V)
    np.testing.assert_allclose(last[0, -1], want[0, -1], rtol=1e-5, atol=1e-5)


def test_a_head_that_differs_from_the_table_is_not_fused():
    proto = _model(tied=True)
    head = next(t for t in proto.graph.initializer if t.name == "head")
    values = numpy_helper.to_array(head).copy()
    values[0, 0] += 1.0
    head.CopyFrom(numpy_helper.from_array(values, "head"))
    assert edit_build(proto)["tied_lm_head"] is False


def test_a_graph_without_a_matmul_head_is_left_alone():
    proto = _model(tied=False)
    proto.graph.node[-1].op_type = "Gemm"
    assert edit_build(proto) == {}
    assert KEEP_INPUT not in {i.name for i in proto.graph.input}
