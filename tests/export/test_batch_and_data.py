"""Graph properties beyond batch-1 runs: any batch size, and weights in external data."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from edgekit.types import ExportedGraph


def _run(session, graph, ids):
    """One prefill of ``ids`` (B, S) with an empty concat cache."""
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for layer in graph.layers:
        for kv in ("key", "value"):
            shape = (ids.shape[0], layer.num_kv_heads, 0, layer.head_dim)
            feeds[f"past_key_values.{layer.index}.{kv}"] = np.zeros(shape, np.float32)
    return session.run(["logits"], feeds)[0]


@pytest.mark.parametrize("target", ["ort", "portable"])
def test_a_batch_equals_its_rows_alone(exported, target):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", target))
    session = ort.InferenceSession(str(graph.model_path), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(0).integers(1, 2048, size=(3, 12))
    together = _run(session, graph, ids)
    for row in range(3):
        alone = _run(session, graph, ids[row : row + 1])
        np.testing.assert_allclose(together[row], alone[0], atol=1e-5)


def test_weights_are_page_aligned_external_data(exported):
    """Every export keeps its weights in model.onnx.data, each at a page-aligned offset (ORT maps those)."""
    import onnx

    graph = ExportedGraph.load(exported("LlamaForCausalLM"))
    proto = onnx.load(str(graph.model_path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert len(external) >= 10
    for tensor in external:
        info = {e.key: e.value for e in tensor.external_data}
        assert info["location"] == "model.onnx.data" and int(info.get("offset", 0)) % 4096 == 0
    data = graph.path / "model.onnx.data"
    assert data.stat().st_size > graph.model_path.stat().st_size
