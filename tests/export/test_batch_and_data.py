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


def test_external_data_export_runs(tmp_path, hf_folder, monkeypatch):
    import edgekit.export as export
    from edgekit.validate import validate

    monkeypatch.setattr(export, "EXTERNAL_DATA_BYTES", 0)  # force the >2 GB layout on a tiny model
    out = tmp_path / "external"
    export.export_model(str(hf_folder("LlamaForCausalLM")), out)
    data = out / "model.onnx.data"
    assert data.is_file() and data.stat().st_size > (out / "model.onnx").stat().st_size
    report = validate(out, str(hf_folder("LlamaForCausalLM")), steps=4)
    assert report.passed and report.greedy_match == 4
