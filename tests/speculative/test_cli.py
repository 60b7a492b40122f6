"""`edgekit run --speculative` as users run it: the same text as plain decoding, its figures, its refusals."""

from __future__ import annotations

import json
import shutil

from tests.cli.test_run_errors import assert_refused, edgekit

PROMPT = "def add(a, b):\n    return a + b\n\ndef add(a, b):\n"


def run_json(*args):
    result = edgekit("run", *args, "--json", "--max-new-tokens", "16")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ngram_and_draft_print_plain_decodings_text_and_their_figures(exported):
    target = str(exported("Qwen3ForCausalLM", "ort"))
    plain = run_json(target, "--prompt", PROMPT)
    lookup = run_json(target, "--prompt", PROMPT, "--speculative", "ngram", "--draft-tokens", "3")
    draft = run_json(target, "--prompt", PROMPT, "--speculative", f"draft:{target}")
    assert lookup["token_ids"] == plain["token_ids"] == draft["token_ids"]
    assert "speculative" not in plain
    assert draft["speculative"]["acceptance_rate"] == 1.0  # the target as its own draft
    figures = lookup["speculative"]
    assert figures["steps"] < 16 or figures["proposed"] == 0
    shown = edgekit("run", target, "--prompt", PROMPT, "--max-new-tokens", "8", "--speculative", "ngram")
    assert shown.returncode == 0 and "speculative:" in shown.stderr and "accepted" in shown.stderr


def test_bad_choices_are_refused_before_any_work(exported, tmp_path):
    target = exported("Qwen3ForCausalLM", "ort")
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--speculative", "eagle"),
                   "error: --speculative 'eagle' is not a proposer", "hint: use ngram, draft:PATH")
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--draft-tokens", "3"),
                   "error: --draft-tokens applies with --speculative")
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--speculative", "ngram", "--draft-tokens", "0"),
                   "error: --draft-tokens 0 is outside 1..32")
    assert_refused(edgekit("run", str(target), "--chat", "--speculative", "ngram"),
                   "error: --speculative applies to one completion, not --chat")


def test_a_draft_with_another_tokenizer_is_refused(exported, tmp_path):
    target = exported("Qwen3ForCausalLM", "ort")
    other = tmp_path / "other-tokenizer"
    shutil.copytree(exported("LlamaForCausalLM", "ort"), other)
    config = json.loads((other / "tokenizer.json").read_text())
    config["added_tokens"] = config.get("added_tokens", [])[:-1]  # another tokenizer, same vocabulary size
    (other / "tokenizer.json").write_text(json.dumps(config))
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--speculative", f"draft:{other}"),
                   f"error: draft {other} has another tokenizer than the target", "hint: use a draft exported")


def test_a_draft_with_a_shorter_context_is_refused(exported, tmp_path):
    target = exported("Qwen3ForCausalLM", "ort")
    short = tmp_path / "short-context"
    shutil.copytree(exported("LlamaForCausalLM", "ort"), short)
    sidecar = json.loads((short / "edgekit.json").read_text())
    sidecar["model"]["max_position_embeddings"] = 64
    (short / "edgekit.json").write_text(json.dumps(sidecar))
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--speculative", f"draft:{short}"),
                   f"error: draft {short} holds 64 positions, the target {target} 1024",
                   "hint: use a draft with at least the target's context length")


def test_a_build_carries_its_draft_into_a_bundle(exported, tmp_path):
    """`build --draft` copies the draft into BUILD/draft; the bundle carries it; `run BUNDLE --speculative
    draft` opens it from the unpacked engine and prints plain decoding's tokens."""
    target, draft = exported("Qwen3ForCausalLM", "ort"), exported("LlamaForCausalLM", "ort")
    build, bundle = tmp_path / "build", tmp_path / "model.edgepkg"
    done = edgekit("build", str(target), "--profile", "cpu-x86-64", "-o", str(build), "--draft", str(draft))
    assert done.returncode == 0, done.stderr
    assert (build / "draft" / "edgekit.json").is_file()
    assert edgekit("package", str(build), "-o", str(bundle)).returncode == 0
    plain = run_json(str(bundle), "--prompt", PROMPT)
    fast = run_json(str(bundle), "--prompt", PROMPT, "--speculative", "draft")
    assert fast["token_ids"] == plain["token_ids"] and fast["speculative"]["proposed"] > 0


def test_a_folder_without_a_draft_and_a_bad_draft_are_refused(exported, tmp_path):
    target = exported("Qwen3ForCausalLM", "ort")
    assert_refused(edgekit("run", str(target), "--prompt", "x", "--speculative", "draft"),
                   f"error: {target} carries no draft model ({target / 'draft'} is missing)",
                   "hint: build it with one (edgekit build EXPORT --profile P -o OUT --draft DRAFT)")
    out = tmp_path / "build"
    assert_refused(edgekit("build", str(target), "--profile", "cpu-x86-64", "-o", str(out), "--draft", str(tmp_path)),
                   f"error: --draft {tmp_path} is not an export or build folder (no edgekit.json)")
    short = tmp_path / "short-context"
    shutil.copytree(exported("LlamaForCausalLM", "ort"), short)
    sidecar = json.loads((short / "edgekit.json").read_text())
    sidecar["model"]["max_position_embeddings"] = 64
    (short / "edgekit.json").write_text(json.dumps(sidecar))
    assert_refused(edgekit("build", str(target), "--profile", "cpu-x86-64", "-o", str(out), "--draft", str(short)),
                   f"error: draft {short} holds 64 positions")
    assert not out.exists()  # refused before anything is written


def test_run_closes_the_proposer_also_when_generation_fails(exported, monkeypatch):
    """The draft's session (device memory on a GPU runtime) is freed whether the run succeeds or not."""
    from typer.testing import CliRunner

    import edgekit.speculative
    from edgekit.cli import app

    closed = []

    class Proposer:
        def propose(self, context, k):
            raise RuntimeError("the draft failed")

        def observe(self, context, first, hidden):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(edgekit.speculative, "open_proposer", lambda *args, **kwargs: Proposer())
    result = CliRunner().invoke(app, ["run", str(exported("Qwen3ForCausalLM", "ort")), "--prompt-ids", "1,2,3",
                                      "--max-new-tokens", "4", "--speculative", "ngram"])
    assert isinstance(result.exception, RuntimeError) and closed == [True]


def test_speculative_decoding_imports_no_torch_transformers_or_export_code():
    import subprocess
    import sys

    code = """
import sys
for name in ("torch", "transformers"):
    sys.modules[name] = None  # importing them raises
import edgekit.speculative, edgekit.speculative.draft, edgekit.speculative.mtp, edgekit.speculative.ngram
bad = sorted(m for m in sys.modules if m.startswith("edgekit.export") or m.split(".")[0] in
             ("torch", "transformers", "onnxscript") and sys.modules[m] is not None)
assert not bad, bad
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
