"""The ort target where GroupQueryAttention cannot rotate: partial rotary (Qwen3.5 at 0.25) and head sizes
that are not a multiple of 16 get their rotary outside the kernel, and still match PyTorch.

ONNX Runtime checks GQA's rotary tables at the first forward pass, not when it loads the graph, so
an export that ignored the rule exported fine and then failed in run, validate, bench and serve.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest

from tests.cli.test_cli import edgekit

# name -> (architecture, config overrides): R/2 = cos_cache width, D = head_dim
CASES = {
    "qwen3_5-partial-0.25": ("Qwen3_5ForCausalLM", {"partial_rotary_factor": 0.25}),  # D 32, R/2 4
    "llama-head-24": ("LlamaForCausalLM", {"head_dim": 24}),  # D 24 (not % 16), R/2 12
}


@pytest.fixture(scope="module")
def make_folder(tmp_path_factory):
    """factory(architecture, overrides) -> a tiny HF folder (seeded weights, preset tokenizer)."""
    import torch
    import transformers

    from edgekit.export.archs import families
    from edgekit.export.presets import TOKENIZER_DIR

    def make(architecture: str, overrides: dict):
        config = families()[architecture].tiny_config()
        for key, value in overrides.items():
            if key == "partial_rotary_factor" and "rope_parameters" in config:
                config["rope_parameters"] = {**config["rope_parameters"], key: value}
            else:
                config[key] = value
        folder = tmp_path_factory.mktemp(architecture)
        torch.manual_seed(1234)
        getattr(transformers, architecture)(transformers.AutoConfig.for_model(**config)).save_pretrained(folder)
        for item in TOKENIZER_DIR.iterdir():
            shutil.copy(item, folder / item.name)
        return folder

    return make


@pytest.fixture(scope="module")
def case(make_folder, tmp_path_factory):
    """factory(name) -> (HF folder, ort export, the export command's result); exported once, by the CLI."""
    made = {}

    def get(name: str):
        if name not in made:
            folder = make_folder(*CASES[name])
            out = tmp_path_factory.mktemp("exports") / name
            result = edgekit("export", str(folder), "-o", str(out), "--target", "ort")
            assert result.returncode == 0, result.stderr
            made[name] = folder, out, result
        return made[name]

    return get


def _gqa_nodes(out):
    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]


def _do_rotary(node) -> int:
    return next((a.i for a in node.attribute if a.name == "do_rotary"), 0)


@pytest.mark.parametrize("name", CASES)
def test_ort_export_matches_pytorch_when_gqa_cannot_rotate(case, name):
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine
    from edgekit.runtimes.torch import TorchSession, load_reference
    from edgekit.validate import validate

    folder, out, _ = case(name)
    nodes = _gqa_nodes(out)
    assert nodes and all(_do_rotary(n) == 0 and len(n.input) == 7 for n in nodes)  # no cos/sin for the kernel
    # 100 prompt tokens cross Qwen3.5's 64-token chunk; teacher-forced logits and free greedy runs both agree.
    report = validate(out, str(folder), prompt_length=100, steps=32)
    assert report.greedy_match == report.greedy_total == 32
    assert report.max_abs_diff < 1e-3
    session, reference = open_engine(out), TorchSession(load_reference(str(folder)))
    for length in (1, 9, 70):
        prompt = np.random.default_rng(length).integers(1, 2048, size=length).tolist()
        assert generate(session, prompt, 8).token_ids == generate(reference, prompt, 8).token_ids


def test_served_rows_of_different_lengths_rotate_at_their_own_positions(case):
    """Batched decode: right-padded rows, each rotated at its own length (the positions come from the mask)."""
    from edgekit.runtimes.registry import open_engine
    from edgekit.serve.engine import BatchedEngine

    _, out, _ = case("llama-head-24")
    prompts = [[5, 17, 99], [7, 1000, 42, 3, 250, 8, 11, 600, 2]]
    engine = BatchedEngine(open_engine(out, threads=1), max_batch=2, max_context=64)
    for row, prompt in enumerate(prompts):
        engine.prefill(row, prompt)
    batched = engine.decode([1, 2], [len(p) for p in prompts])  # (2, vocab)
    for prompt, token, logits in zip(prompts, [1, 2], batched):
        alone = open_engine(out, threads=1)
        alone.forward(prompt)
        np.testing.assert_allclose(logits, alone.forward([token])[-1], atol=1e-4)


def test_families_keep_the_rotary_in_the_kernel(exported):
    nodes = _gqa_nodes(exported("Qwen3ForCausalLM", "ort"))
    assert nodes and all(_do_rotary(n) == 1 and len(n.input) == 9 for n in nodes)


def test_export_prints_no_torch_warnings(case):
    """torch's own logging set-up used to undo the quieting: 'torchvision is not installed' x4 per export."""
    _, _, result = case("qwen3_5-partial-0.25")
    assert "torchvision" not in result.stderr
    assert not [line for line in result.stderr.splitlines() if line[:1] in "WE" and line[1:5].isdigit()]
    assert result.stderr.startswith("Exporting ")


def test_head_size_gqa_rejects_is_refused_at_export(make_folder, tmp_path):
    folder = make_folder("LlamaForCausalLM", {"head_dim": 12})
    out = tmp_path / "out"
    result = edgekit("export", str(folder), "-o", str(out), "--target", "ort")
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert ("error: layer 0: head_dim 12 is not a multiple of 8, which ONNX Runtime's GroupQueryAttention "
            "(the ort target's attention) requires") in lines
    assert "hint: export with --target portable (standard ONNX attention), which runs on ONNX Runtime too" in lines
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither OUT nor its .partial work folder


def _gqa_runs(d: int, half: int) -> bool:
    """One GroupQueryAttention node (2 heads, 1 KV head, 3 tokens) on ORT's CPU kernel: does it run?"""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    rotary = half > 0
    names = ["q", "k", "v", "pk", "pv", "seqlens", "total"] + (["cos", "sin"] if rotary else [])
    kinds = {"seqlens": TensorProto.INT32, "total": TensorProto.INT32}
    inputs = [helper.make_tensor_value_info(n, kinds.get(n, TensorProto.FLOAT), None) for n in names]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "pk_out", "pv_out")]
    node = helper.make_node("GroupQueryAttention", names, ["o", "pk_out", "pv_out"], domain="com.microsoft",
                            num_heads=2, kv_num_heads=1, do_rotary=int(rotary))
    model = helper.make_model(helper.make_graph([node], "gqa", inputs, outputs),
                              opset_imports=[helper.make_opsetid("", 23), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((1, 3, 2 * d)).astype(np.float32)
    feed = {"q": x, "k": x[..., :d], "v": x[..., :d], "pk": np.zeros((1, 1, 0, d), np.float32),
            "pv": np.zeros((1, 1, 0, d), np.float32), "seqlens": np.array([2], np.int32),
            "total": np.array(3, np.int32)}
    if rotary:
        feed["cos"], feed["sin"] = np.ones((8, half), np.float32), np.zeros((8, half), np.float32)
    try:
        session.run(None, feed)
    except Exception:
        return False
    return True


def test_the_export_rule_is_the_kernels_rule():
    """gqa_rotary_fits / check_gqa_head against the installed kernel: a new onnxruntime that changes
    its checks fails here rather than at a user's first forward pass."""
    from edgekit.errors import EdgekitError
    from edgekit.export.ops.attention import check_gqa_head, gqa_rotary_fits

    for d in (8, 12, 16, 20, 24, 40, 64):
        try:
            check_gqa_head(d, 0)
            accepted = True
        except EdgekitError:
            accepted = False
        assert accepted == _gqa_runs(d, 0), d
    for d in (16, 24, 32, 40, 48, 64):
        for half in range(4, d // 2 + 1, 4):
            assert gqa_rotary_fits(d, half) == _gqa_runs(d, half), (d, half)
