"""Weight-only quantization, measured: quality of int4/int8 builds of the trained ``tiny-code`` preset
on held-out text, a broken quantization caught, and file sizes on a model with large matrices."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgekit.engines import BuildRefused, QuantOptions, build_engine, plan_build
from edgekit.export.presets import TRAINED
from edgekit.quality import measure_quality
from edgekit.quantize import model_bytes

PRESET = "tiny-code"
HELDOUT = TRAINED[PRESET] / "heldout.txt"
PROFILE = "cpu-x86-64"  # built here, run here: the quality runs do not check the machine's CPU flags


@pytest.fixture(scope="module")
def tiny_code_export(tmp_path_factory):
    from edgekit.export import export_model

    out = tmp_path_factory.mktemp("tiny-code") / "export"
    export_model(PRESET, out, target="ort", dtype="fp32")
    return out


@pytest.fixture(scope="module")
def built(tiny_code_export, tmp_path_factory):
    """factory(name, **QuantOptions fields, precision=None) -> a build folder (cached per module)."""
    made = {}

    def make(name: str, precision: str | None = None, **quant) -> object:
        if name not in made:
            out = tmp_path_factory.mktemp("builds") / name
            build_engine(tiny_code_export, PROFILE, out, precision=precision, quant=QuantOptions(**quant))
            made[name] = out
        return made[name]

    return make


@pytest.fixture(scope="module")
def quality(built):
    """factory(name) -> QualityReport of that build on heldout.txt (cached)."""
    reports = {}

    def measure(name: str, path=None):
        if name not in reports:
            reports[name] = measure_quality(path or built(name), PRESET, HELDOUT)
        return reports[name]

    return measure


def test_plan_records_quantization(tiny_code_export):
    default = plan_build(tiny_code_export, PROFILE)
    assert (default.quantization, default.quant_method, default.quant_block_size, default.quant_accuracy_level) == \
        ("int4", "rtn", 32, 4)  # the profile's defaults.quantization / quant_block_size / quant_accuracy_level
    assert default.quant_embeddings is True and default.quant_lm_head is True
    assert plan_build(tiny_code_export, PROFILE, precision="fp32").quantization == "none"
    gptq = plan_build(tiny_code_export, PROFILE, quant=QuantOptions("int4", "gptq", 64, calibration=str(HELDOUT)))
    assert gptq.to_dict()["quant_method"] == "gptq" and gptq.quant_block_size == 64 and gptq.calibration == str(HELDOUT)
    with pytest.raises(BuildRefused, match="calibration"):
        plan_build(tiny_code_export, PROFILE, quant=QuantOptions("int4", "gptq"))
    with pytest.raises(BuildRefused, match="CPU EP"):
        plan_build(tiny_code_export, "l4", runtime="ort-cuda", quant=QuantOptions("int4"))


def test_fp32_build_matches_reference(built, quality):
    built("fp32", precision="fp32")
    report = quality("fp32")
    assert report.top1_agreement == 1.0 and report.kl_divergence < 1e-6
    assert abs(report.perplexity / report.reference_perplexity - 1) < 1e-4
    assert report.reference_perplexity < 500  # trained (held-out 288): untrained weights score about the vocabulary, 2048


def test_int4_rtn_quality(built, quality):
    built("int4-rtn", quantization="int4", method="rtn")
    report = quality("int4-rtn")
    assert report.perplexity <= report.reference_perplexity * 1.05, report
    assert report.top1_agreement >= 0.90, report
    assert report.passed


def test_int4_gptq_at_least_as_good_as_rtn(built, quality):
    built("int4-rtn", quantization="int4", method="rtn")
    built("int4-gptq", quantization="int4", method="gptq", calibration=str(TRAINED[PRESET] / "calibration.txt"))
    rtn, gptq = quality("int4-rtn"), quality("int4-gptq")
    assert gptq.passed, gptq
    assert gptq.kl_divergence <= rtn.kl_divergence * 1.10, (gptq, rtn)


def test_int8_quality(built, quality):
    built("int8", quantization="int8")
    report = quality("int8")
    assert report.passed and report.top1_agreement >= 0.95, report


def test_broken_scales_are_caught(built, quality, tmp_path):
    """Zeroing the scales of one MatMulNBits (the first MLP down projection, K = intermediate) must show."""
    import onnx
    from onnx import numpy_helper

    broken = tmp_path / "broken"
    shutil.copytree(built("int4-rtn", quantization="int4", method="rtn"), broken)
    model = onnx.load(str(broken / "model.onnx"))
    intermediate = json.loads((TRAINED[PRESET] / "config.json").read_text())["intermediate_size"]
    node = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                and any(a.name == "K" and a.i == intermediate for a in n.attribute))
    scales = next(t for t in model.graph.initializer if t.name == node.input[2])
    scales.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(scales)), scales.name))
    onnx.save_model(model, str(broken / "model.onnx"), save_as_external_data=True, location="model.onnx.data.broken")
    good, bad = quality("int4-rtn"), measure_quality(broken, PRESET, HELDOUT)
    assert not bad.passed, bad
    assert bad.perplexity > good.perplexity * 1.2 and bad.top1_agreement < good.top1_agreement - 0.1, (bad, good)


def test_sidecar_records_quantization(built):
    data = json.loads((built("int4-rtn", quantization="int4", method="rtn") / "edgekit.json").read_text())["build"]
    assert data["quantization"] == "int4" and data["quant_method"] == "rtn" and data["quant_block_size"] == 32
    assert data["quantize"]["quantized_matmuls"] == 4 * 7 + 1  # q k v o gate up down per layer + lm_head
    assert data["quantize"]["quantized_gathers"] == 1 and data["quant_embeddings"] is True  # the embedding table
    assert data["quantize"]["model_bytes"] < data["quantize"]["fp32_model_bytes"]


@pytest.mark.parametrize("symmetric", [False, True])
def test_tied_embedding_reads_the_lm_head_int4_table(built, symmetric):
    """tiny-code ties its embedding and LM head: one int4 table, and each gathered row is that
    table's dequantized row (MatMulNBits layout: low nibble first; a zero point per block, or
    symmetric: none, each level q meaning (q - 8) x scale)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    folder = (built("int4-sym", quantization="int4", method="rtn", symmetric=True) if symmetric
              else built("int4-rtn", quantization="int4", method="rtn"))
    figures = json.loads((folder / "edgekit.json").read_text())["build"]["quantize"]
    assert figures["tied_table_shared"] is True and figures["clip_search"] is True
    model = onnx.load(str(folder / "model.onnx"))
    inits = {t.name: t for t in model.graph.initializer}
    config = json.loads((TRAINED[PRESET] / "config.json").read_text())
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    assert not [t for t in inits.values() if sorted(t.dims) == sorted([vocab, hidden])]  # no fp32 table left
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0])
    attrs = {a.name: helper.get_attribute_value(a) for a in head.attribute}
    block = attrs["block_size"]
    assert all(n.op_type != "MatMulNBits" or (len(n.input) == 3) == symmetric for n in model.graph.node)
    data, scales = (numpy_helper.to_array(inits[name]) for name in head.input[1:3])
    nibbles = np.stack([data & 0x0F, data >> 4], axis=-1).reshape(vocab, hidden // block, block)
    if symmetric:
        zeros = np.full((vocab, hidden // block), 8)
    else:
        zeros = numpy_helper.to_array(inits[head.input[3]])
        zeros = np.stack([zeros & 0x0F, zeros >> 4], axis=-1).reshape(vocab, -1)[:, :hidden // block]
    levels = nibbles.astype(np.float32) - zeros[..., None].astype(np.float32)
    rows = (levels * scales.reshape(vocab, -1, 1)).reshape(vocab, hidden)

    embedded = next(n for n in model.graph.node if n.input and n.input[0] == gather.output[0]).output[0]
    model.graph.output.append(helper.make_tensor_value_info(embedded, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.array([[0, 7, vocab - 1]], dtype=np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "logits_to_keep": np.zeros(1, np.int64)}
    for i in model.graph.input:
        if i.name.startswith("past"):  # (batch, kv heads, 0 past positions, head_dim)
            shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
            feeds[i.name] = np.zeros([1, shape[1], 0, shape[3]], np.float32)
    got = session.run([embedded], feeds)[0]
    np.testing.assert_allclose(got.reshape(3, hidden), rows[ids[0]], rtol=1e-6, atol=1e-6)


def test_an_8_bit_lm_head_is_shared_by_the_embedding_and_closer_to_fp32(built, quality):
    import onnx
    from onnx import helper

    folder = built("int4-head8", quantization="int4", method="rtn", lm_head_bits=8)
    data = json.loads((folder / "edgekit.json").read_text())["build"]
    assert data["quant_lm_head_bits"] == 8 and data["quantize"]["tied_table_shared"] is True
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    bits = lambda node: {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("bits", 4)  # noqa: E731
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    head = next(n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == gather.input[0])
    assert bits(head) == bits(gather) == 8
    assert {bits(n) for n in model.graph.node if n.op_type == "MatMulNBits" and n is not head} == {4}
    built("int4-rtn", quantization="int4", method="rtn")
    eight, four = quality("int4-head8"), quality("int4-rtn")
    assert eight.passed and eight.kl_divergence < 0.5 * four.kl_divergence, (eight, four)
    assert eight.top1_agreement > four.top1_agreement


def test_symmetric_int4_is_within_the_asymmetric_quality(built, quality):
    """No zero points (llama.cpp's Q4_0 form): the clip-searched scales keep the measured quality
    close to the asymmetric build's, with the 4- and the 8-bit LM head."""
    built("int4-sym", quantization="int4", method="rtn", symmetric=True)
    built("int4-rtn", quantization="int4", method="rtn")
    built("int4-sym-head8", quantization="int4", method="rtn", symmetric=True, lm_head_bits=8)
    built("int4-head8", quantization="int4", method="rtn", lm_head_bits=8)
    plan = json.loads((built("int4-sym") / "edgekit.json").read_text())["build"]
    assert plan["quant_symmetric"] is True and plan["quantize"]["clip_search"] is True
    for sym, asym in (("int4-sym", "int4-rtn"), ("int4-sym-head8", "int4-head8")):
        a, b = quality(sym), quality(asym)
        assert a.passed and a.kl_divergence < 1.3 * b.kl_divergence, (sym, a, b)
        assert a.top1_agreement > b.top1_agreement - 0.03, (sym, a, b)


def test_int4_is_under_30_percent_of_fp32_on_large_matrices(tmp_path):
    """A scaled-down LLM whose matrices dominate its embeddings (as in 0.6B+ models minus the vocabulary)."""
    import torch
    import transformers

    from edgekit.export import export_model
    from edgekit.export.archs.base import tiny_common
    from edgekit.export.presets import TOKENIZER_DIR

    values = tiny_common(architectures=["Qwen3ForCausalLM"], model_type="qwen3", hidden_size=256, intermediate_size=1024,
                         num_hidden_layers=4, head_dim=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    folder = tmp_path / "hf"
    transformers.Qwen3ForCausalLM(transformers.AutoConfig.for_model(**values)).save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, folder / item.name)
    export = export_model(str(folder), tmp_path / "export").path
    fp32 = build_engine(export, PROFILE, tmp_path / "fp32", precision="fp32").path
    int4 = build_engine(export, PROFILE, tmp_path / "int4", quant=QuantOptions("int4")).path
    ratio = model_bytes(int4 / "model.onnx") / model_bytes(fp32 / "model.onnx")
    assert ratio <= 0.30, ratio


def test_cli_build_and_validate_quality(tiny_code_export, tmp_path):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                              capture_output=True, text=True, timeout=600)

    out = tmp_path / "int4"
    built = run("build", str(tiny_code_export), "--profile", PROFILE, "--quant", "int4", "--block-size", "16",
                "--no-quant-lm-head", "--quality", str(HELDOUT), "-o", str(out), "--json")
    assert built.returncode == 0, built.stderr
    sidecar = json.loads(built.stdout)
    assert sidecar["quant_block_size"] == 16 and sidecar["quant_lm_head"] is False
    assert sidecar["quantize"]["quantized_matmuls"] == 4 * 7 and sidecar["quality"]["top1_agreement"] >= 0.9
    checked = run("validate", str(out), "--reference", PRESET, "--quality", str(HELDOUT), "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    assert {"perplexity", "reference_perplexity", "top1_agreement", "kl_divergence"} <= set(report)
    assert report["perplexity"] == pytest.approx(sidecar["quality"]["perplexity"], rel=1e-6)
    bad = run("build", str(tiny_code_export), "--profile", PROFILE, "--quant", "int3", "--dry-run")
    assert bad.returncode != 0 and "--quant 'int3'" in bad.stderr and "hint:" in bad.stderr


def test_build_reports_progress_with_sensible_counts(tiny_code_export, tmp_path):
    """on_progress follows the build: the backend, each weight quantized, the save, each quality window."""
    calls = []
    engine = build_engine(tiny_code_export, PROFILE, tmp_path / "int4", quant=QuantOptions("int4", "rtn"),
                          quality_text=HELDOUT, on_progress=lambda *call: calls.append(call))
    steps = list(dict.fromkeys(what for what, _, _ in calls))
    # tiny-code ties its embedding to the LM head: the Gather reads the head's int4 table, no second pass
    assert steps == [f"building ort-cpu for {PROFILE}", "int4: quantizing weights", "int4: searching clip ranges",
                     "saving the quantized model", "loading the engine and the reference",
                     "scoring heldout.txt, window by window"]
    counts = {step: [(done, total) for what, done, total in calls if what == step] for step in steps}
    weights = counts["int4: quantizing weights"]
    total = weights[0][1]
    assert {t for _, t in weights} == {total} and total >= engine.details["quantize"]["quantized_matmuls"] > 0
    assert [d for d, _ in weights] == [*range(total + 1), total]  # one call per weight offered, then done
    searched = counts["int4: searching clip ranges"]
    assert searched == [(i, total) for i in range(total)] + [(total, total)]  # each int4 MatMulNBits once
    windows = engine.quality["windows"]
    assert counts["scoring heldout.txt, window by window"] == [(i, windows) for i in range(1, windows + 1)]


def test_lm_head_bits_refusals_as_printed(exported, tmp_path):
    from tests.cli.test_cli import edgekit

    path = str(exported("Qwen3ForCausalLM"))
    five = edgekit("build", path, "--profile", PROFILE, "--quant", "int4", "--lm-head-bits", "5", "--dry-run")
    assert five.returncode == 1 and five.stdout == ""
    assert five.stderr.splitlines()[:2] == ["error: --lm-head-bits 5 is not 4 or 8",
                                           "hint: use --lm-head-bits 8 (closer to fp32) or 4"]
    out = tmp_path / "b"
    gptq = edgekit("build", path, "--profile", PROFILE, "--quant", "int4", "--quant-method", "gptq", "--calibration",
                   str(HELDOUT), "--lm-head-bits", "8", "-o", str(out))
    assert gptq.returncode == 1 and "error: --lm-head-bits 8 needs --quant-method rtn" in " ".join(gptq.stderr.split())
    assert not out.exists()
    plan = edgekit("build", path, "--profile", PROFILE, "--quant", "int4", "--lm-head-bits", "8", "--dry-run")
    assert plan.returncode == 0 and "LM head int8" in plan.stdout, plan.stderr
    gptq = edgekit("build", path, "--profile", PROFILE, "--quant", "int4", "--quant-method", "gptq", "--calibration",
                   str(HELDOUT), "--symmetric", "-o", str(out))
    assert gptq.returncode == 1 and gptq.stderr.splitlines()[:2] == [
        "error: --symmetric is for --quant-method rtn", "hint: drop --symmetric, or use --quant-method rtn"]
    assert not out.exists()
    plan = edgekit("build", path, "--profile", PROFILE, "--quant", "int4", "--symmetric", "--dry-run")
    assert plan.returncode == 0 and "symmetric" in plan.stdout, plan.stderr


def test_llamacpp_scheme_scores_the_second_half_of_whole_windows(built):
    """``second_half``: llama-perplexity's windows (whole ones only, each scoring its second half), so
    its figures and edgekit's are of the same tokens; the full scheme scores every prediction."""
    from edgekit.errors import EdgekitError
    from edgekit.quality import text_token_ids
    from edgekit.types import ExportedGraph

    folder = built("int4-rtn", quantization="int4", method="rtn")
    ids = text_token_ids(ExportedGraph.load(folder), HELDOUT)
    half = measure_quality(folder, PRESET, HELDOUT, max_tokens=None, window=256, second_half=True)
    full = measure_quality(folder, PRESET, HELDOUT, max_tokens=None, window=256)
    assert half.windows == len(ids) // 256 and half.tokens == half.windows * (256 // 2 - 1)
    assert full.tokens == len(ids) - full.windows and full.tokens > 2 * half.tokens
    assert half.reference_perplexity != full.reference_perplexity  # other tokens, other contexts
    with pytest.raises(EdgekitError, match="the text has 500 tokens, under one 1024-token window"):
        measure_quality(folder, PRESET, HELDOUT, max_tokens=500, window=1024, second_half=True)
