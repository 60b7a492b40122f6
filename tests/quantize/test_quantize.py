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
    assert steps == [f"building ort-cpu for {PROFILE}", "int4: quantizing weights", "int4: quantizing the embedding",
                     "saving the quantized model", "loading the engine and the reference",
                     "scoring heldout.txt, window by window"]
    counts = {step: [(done, total) for what, done, total in calls if what == step] for step in steps}
    weights = counts["int4: quantizing weights"]
    total = weights[0][1]
    assert {t for _, t in weights} == {total} and total >= engine.details["quantize"]["quantized_matmuls"] > 0
    assert [d for d, _ in weights] == [*range(total + 1), total]  # one call per weight offered, then done
    assert counts["int4: quantizing the embedding"][-1] == (1, 1)
    windows = engine.quality["windows"]
    assert counts["scoring heldout.txt, window by window"] == [(i, windows) for i in range(1, windows + 1)]
