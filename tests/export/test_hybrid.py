"""Hybrid Qwen3.5: Gated DeltaNet + gated attention across targets, lengths and chunk boundaries."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import pytest

from edgekit.types import TARGETS, ExportedGraph

ARCH = "Qwen3_5ForCausalLM"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("architecture", [ARCH, "Qwen3NextForCausalLM"])
def test_prompt_longer_than_the_chunk(exported, hf_folder, architecture, target):
    from edgekit.validate import validate

    report = validate(exported(architecture, target), str(hf_folder(architecture)), prompt_length=100, steps=32)
    assert report.greedy_match == report.greedy_total == 32
    assert report.max_abs_diff < 1e-3


def _all_ops(model: onnx.ModelProto) -> Counter:
    ops: Counter = Counter()
    def walk(graph):
        for node in graph.node:
            ops[(node.domain or "", node.op_type)] += 1
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g)
    walk(model.graph)
    return ops


def test_ort_target_uses_the_fused_kernels(exported, tmp_path):
    """The delta rule on ORT's LinearAttention; the conv as a depthwise Conv that ORT's optimizer
    turns into its NCHWc kernel (the faster one, benchmarks/NOTES.md); fp16 keeps CausalConvWithState."""
    import onnxruntime as ort

    model = exported(ARCH, "ort") / "model.onnx"
    ops = _all_ops(onnx.load(str(model)))
    assert ops[("com.microsoft", "LinearAttention")] == 3 and ("com.microsoft", "CausalConvWithState") not in ops
    assert ops[("", "Conv")] == 3 and ops[("com.microsoft", "GroupQueryAttention")] == 1
    assert ("", "Loop") not in ops
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    optimized = _all_ops(onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False))
    assert optimized[("com.microsoft.nchwc", "Conv")] == 3 and ("", "Conv") not in optimized
    half = _all_ops(onnx.load(str(exported(ARCH, "ort", "fp16") / "model.onnx"), load_external_data=False))
    assert half[("com.microsoft", "CausalConvWithState")] == 3 and ("", "Conv") not in half


@pytest.mark.parametrize("target", ["portable", "decomposed"])
def test_standard_targets_scan_chunks_in_one_loop(exported, target):
    ops = _all_ops(onnx.load(str(exported(ARCH, target) / "model.onnx")))
    assert all(domain in ("", "ai.onnx") for domain, _ in ops)
    assert ops[("", "Loop")] == 3  # one per Gated DeltaNet layer, however long the prompt


def test_states_are_recorded_per_layer(exported):
    graph = ExportedGraph.load(exported(ARCH, "ort"))
    kinds = [layer.kind for layer in graph.layers]
    assert kinds == ["linear_attention"] * 3 + ["attention"]
    linear = graph.layers[0]
    assert linear.states == {"conv": [2 * 2 * 16 + 4 * 16, 3], "recurrent": [4, 16, 16]}
    names = [t.name for t in graph.inputs]
    assert names[2:] == ["past_conv.0", "past_recurrent.0", "past_conv.1", "past_recurrent.1", "past_conv.2",
                         "past_recurrent.2", "past_key_values.3.key", "past_key_values.3.value"]
    recurrent = {t.name: t for t in graph.inputs}["past_recurrent.0"]
    assert recurrent.dtype == "float32" and recurrent.shape == ("batch_size", 4, 16, 16)


def test_graph_does_not_depend_on_the_traced_length(hf_folder, tmp_path, monkeypatch):
    import edgekit.export as export
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine
    from edgekit.runtimes.torch import TorchSession, load_reference

    counts = []
    for example in [(2, 3, 5), (2, 70, 9)]:
        monkeypatch.setattr(export, "TRACE_EXAMPLE", example)
        out = tmp_path / f"traced-{example[1]}"
        export.export_model(str(hf_folder(ARCH)), out, target="portable")
        counts.append(sum(_all_ops(onnx.load(str(out / "model.onnx"))).values()))
    assert counts[0] == counts[1]
    session, reference = open_engine(out), TorchSession(load_reference(str(hf_folder(ARCH))))
    for length in (1, 63, 64, 65, 130):
        prompt = np.random.default_rng(length).integers(1, 2048, size=length).tolist()
        assert generate(session, prompt, 4).token_ids == generate(reference, prompt, 4).token_ids


def test_fixed_states_ping_pong_without_allocation(exported):
    from edgekit.runtimes.registry import open_engine

    session = open_engine(exported(ARCH, "ort"))
    session.reset(64)
    linear = [i for i, io in enumerate(session._io) if not io.layer.has_kv]
    buffers = {session._past[i].data_ptr() for i in linear} | {session._spare[i].data_ptr() for i in linear}
    session.forward([1, 2, 3, 4])
    for token in (5, 6, 7):
        session.forward([token])
    after = {session._past[i].data_ptr() for i in linear} | {session._spare[i].data_ptr() for i in linear}
    assert after == buffers and len(buffers) == 2 * len(linear)


def test_qwen3_next_routes_experts_on_the_fused_kernel(exported):
    ops = _all_ops(onnx.load(str(exported("Qwen3NextForCausalLM", "ort") / "model.onnx")))
    assert ops[("com.microsoft", "MoE")] == 3  # layers 0, 2, 3; layer 1 is a dense MLP (mlp_only_layers)
    dense = _all_ops(onnx.load(str(exported("Qwen3NextForCausalLM", "portable") / "model.onnx")))
    assert dense[("", "TopK")] == 3 and dense[("", "ScatterElements")] == 3


def test_moe_routing_matters(hf_folder):
    """Guards the parity tests: uniform routing instead of the top-k must change the output."""
    import torch

    from edgekit.export.ops.moe import moe

    torch.manual_seed(0)
    x, logits = torch.randn(1, 3, 8), torch.randn(1, 3, 4) * 3
    gate_up, down = torch.randn(4, 12, 8), torch.randn(4, 8, 6)
    routed = moe(x, logits, gate_up, down, 2, 1)
    everyone = moe(x, torch.zeros_like(logits), gate_up, down, 4, 1)
    assert (routed - everyone).abs().max() > 1e-2
