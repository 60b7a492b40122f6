"""The shape of what export writes: ops per target, the I/O contract, the sidecar."""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest

from edgekit.types import TARGETS, ExportedGraph


def _ops(path) -> Counter:
    model = onnx.load(str(path / "model.onnx"))
    return Counter((n.domain or "", n.op_type) for n in model.graph.node)


def test_ort_target_uses_fused_contrib_ops(exported):
    path = exported("Qwen3ForCausalLM", "ort")
    ops = _ops(path)
    assert ops[("com.microsoft", "GroupQueryAttention")] == 2  # one per layer
    assert ops[("com.microsoft", "SkipSimplifiedLayerNormalization")] > 0
    assert not [op for op in ops if op[0] == "ai.edgekit"]  # every custom op was lowered


def test_portable_target_uses_standard_ops_only(exported):
    path = exported("MistralForCausalLM", "portable")
    ops = _ops(path)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    assert ops[("", "Attention")] == 2 and ops[("", "RotaryEmbedding")] == 4
    onnx.checker.check_model(str(path / "model.onnx"))
    assert ExportedGraph.load(path).custom_ops == ()


def test_decomposed_target_uses_plain_ops_only(exported):
    """What TensorRT 10.3 (JetPack 6.x) parses: no fused attention, rotary or norm op, no contrib domain."""
    path = exported("MistralForCausalLM", "decomposed")
    ops = _ops(path)
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    fused = {"Attention", "RotaryEmbedding", "RMSNormalization", "LayerNormalization", "SimplifiedLayerNormalization"}
    assert not fused & {op for _, op in ops}
    assert ops[("", "Softmax")] == 2  # one per layer
    assert ops[("", "Expand")] == 4  # GQA: keys and values, 4 heads over 2 KV heads
    onnx.checker.check_model(str(path / "model.onnx"), full_check=True)
    graph = ExportedGraph.load(path)
    assert graph.custom_ops == () and graph.kv_cache["shared_buffer"] is False


def test_sliding_window_reaches_the_kernel(exported):
    model = onnx.load(str(exported("MistralForCausalLM", "ort") / "model.onnx"))
    windows = [
        a.i for n in model.graph.node if n.op_type == "GroupQueryAttention" for a in n.attribute
        if a.name == "local_window_size"
    ]
    assert windows == [16, 16]


def test_sidecar_records_the_contract(exported):
    path = exported("LlamaForCausalLM", "ort")
    data = json.loads((path / "edgekit.json").read_text())
    graph = ExportedGraph.load(path)
    assert data["schema_version"] == 1 and data["kind"] == "export"
    names = [t.name for t in graph.inputs]
    assert names[:2] == ["input_ids", "attention_mask"]
    assert names[2:6] == ["past_key_values.0.key", "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    ids = graph.inputs[0]
    assert ids.dtype == "int64" and ids.shape == ("batch_size", "sequence_length")
    past = graph.inputs[2]
    assert past.shape == ("batch_size", 2, "past_sequence_length", 16)
    logits = graph.outputs[0]
    assert logits.dtype == "float32" and logits.shape == ("batch_size", "sequence_length", 2048)
    assert graph.outputs[1].shape[2] == "present_sequence_length"
    assert [layer.kind for layer in graph.layers] == ["attention", "attention"]
    assert graph.kv_cache["shared_buffer"] is True
    assert graph.custom_ops == ("com.microsoft.GroupQueryAttention", "com.microsoft.SkipSimplifiedLayerNormalization")
    assert {"torch", "transformers", "onnx", "edgekit"} <= set(graph.versions)
    assert "tokenizer.json" in graph.tokenizer_files and (path / "tokenizer.json").is_file()
    assert graph.model.tie_word_embeddings is False and graph.model.head_dim == 16


def test_qwen3_head_dim_comes_from_the_config(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    assert graph.model.head_dim == 32 != graph.model.hidden_size // graph.model.num_heads
    assert graph.inputs[2].shape[3] == 32


@pytest.mark.parametrize("target", TARGETS)
def test_mistral_layers_record_their_window(exported, target):
    graph = ExportedGraph.load(exported("MistralForCausalLM", target))
    assert [(layer.kind, layer.window) for layer in graph.layers] == [("sliding_attention", 16)] * 2
