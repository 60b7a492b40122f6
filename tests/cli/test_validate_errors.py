"""`edgekit validate` refusing comparisons that cannot mean anything, before loading PyTorch's model:
a quantized build without --quality, a reference that is another model. Also the README's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.cli.test_cli import edgekit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def int4_build(exported, tmp_path_factory):
    out = tmp_path_factory.mktemp("int4") / "build"
    done = edgekit("build", str(exported("Qwen3ForCausalLM", "ort")), "--profile", "cpu-x86-64", "--quant", "int4",
                   "-o", str(out))
    assert done.returncode == 0, done.stderr
    return out


def test_int4_build_without_quality_points_at_quality(int4_build, hf_folder):
    reference = str(hf_folder("Qwen3ForCausalLM"))
    result = edgekit("validate", str(int4_build), "--reference", reference)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: {int4_build} has int4 weights: they change the logits by design" in result.stderr
    assert f"hint: measure its quality instead: edgekit validate {int4_build} --reference {reference} " \
           "--quality TEXT" in result.stderr
    # Asked for explicitly, the logit comparison still runs (and reports its figures).
    loose = edgekit("validate", str(int4_build), "--reference", reference, "--tolerance", "100", "--steps", "4",
                    "--json")
    assert "error:" not in loose.stderr, loose.stderr  # ran: random int4 weights may still flip a greedy token
    report = json.loads(loose.stdout)
    assert report["tolerance"] == 100 and report["max_abs_diff"] > 0 and "error" not in report


def test_quality_text_is_accepted_on_an_int4_build(int4_build, hf_folder, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 20)
    result = edgekit("validate", str(int4_build), "--reference", str(hf_folder("Qwen3ForCausalLM")),
                     "--quality", str(text), "--json")
    assert "error:" not in result.stderr, result.stderr  # ran: pass or fail is the report's to say
    assert "perplexity" in json.loads(result.stdout)


@pytest.mark.parametrize("quality", [False, True])
def test_reference_of_another_model_is_named(exported, hf_folder, tmp_path, quality):
    path = exported("Qwen3ForCausalLM", "ort")
    reference = str(hf_folder("LlamaForCausalLM"))
    extra = []
    if quality:
        (tmp_path / "text.txt").write_text("x = 1\n" * 50)
        extra = ["--quality", str(tmp_path / "text.txt")]
    result = edgekit("validate", str(path), "--reference", reference, *extra, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: --reference {reference} is not the model {path} was exported from" in result.stderr
    assert "architecture export Qwen3ForCausalLM, reference LlamaForCausalLM" in result.stderr
    source = json.loads((path / "edgekit.json").read_text())["model"]["source"]
    assert f"hint: pass the model it was exported from: --reference {source}" in result.stderr
    data = json.loads(result.stdout)
    assert data["passed"] is False and "is not the model" in data["error"]


def test_reference_with_other_dimensions_is_named(exported, tmp_path):
    """Same architecture, other sizes: a tiny random Qwen3 export against the tiny-code preset (a bigger Qwen3)."""
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("validate", str(path), "--reference", "tiny-code")
    assert result.returncode == 1
    assert "num_layers export 2, reference 4; hidden_size export 64, reference 128" in result.stderr
    assert "architecture export" not in result.stderr


def test_help_says_builds_work_too():
    result = edgekit("validate", "--help", env={"COLUMNS": "200"})
    assert result.returncode == 0 and "An export or build folder" in result.stdout


def test_readme_documents_usage_errors_exit_2(exported):
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Exit codes", 1)[1]
    assert "| 2 |" in section and "--max-new-tokens abc" in section and "| 1 |" in section
    # What the table says is what happens.
    path = exported("Qwen3ForCausalLM", "ort")
    assert edgekit("run", str(path), "--prompt-ids", "1", "--max-new-tokens", "abc").returncode == 2
    assert edgekit("run", str(path), "--prompt-ids", "1", "--max-new-tokens", "0").returncode == 1
