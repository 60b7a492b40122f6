"""`edgekit run` refusing what cannot work, before any work, as the user sees it (stderr, and a JSON
object on stdout with --json); `--chat` on models that are not chat models or outgrow the context."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

OLD_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LONG_TURN = "def add(a, b): return a + b; " * 38  # about 450 tokens


@pytest.fixture(scope="module")
def tiny_code(tmp_path_factory):
    """The default preset (trained on Python source, not a chat model), exported once."""
    from edgekit.export import export_model

    out = tmp_path_factory.mktemp("tiny-code") / "export"
    export_model("tiny-code", out)
    return out


def edgekit(*args: str, input: str | None = None) -> subprocess.CompletedProcess:
    """The command as a user runs it, with ``input`` on stdin (tests/cli/test_cli.py's helper, plus stdin)."""
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args], input=input,
                          capture_output=True, text=True, env=dict(os.environ), timeout=600)


def assert_refused(result, *expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr


@pytest.mark.parametrize("bad", ["99999", "-1"])
def test_prompt_ids_outside_the_vocabulary(exported, bad):
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("run", str(path), "--prompt-ids", f"1,{bad},2", "--max-new-tokens", "2")
    assert_refused(result, f"error: prompt token id {bad} is outside the vocabulary of 2048 tokens (0..2047)",
                   "hint: pass ids from 0 to 2047")
    assert len(result.stderr.strip().splitlines()) == 2 and result.stdout == ""


def test_prompt_and_new_tokens_over_the_context_are_refused_up_front(exported):
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "1022")
    assert_refused(result, "error: 3 prompt tokens + 1022 --max-new-tokens exceed the context of 1024 tokens",
                   "hint: use --max-new-tokens 1021 or less")
    assert result.stdout == ""  # nothing was generated
    assert edgekit("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "1021", "--json").returncode == 0


@pytest.mark.parametrize("args", [
    ["--prompt-ids", "1,2,3", "--max-new-tokens", "2000"],
    ["--prompt-ids", "5000"],
    ["--prompt-ids", "1,x"],
    ["--temperature", "-1", "--prompt-ids", "1"],
])
def test_json_always_prints_an_object(exported, args):
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("run", str(path), *args, "--json")
    assert_refused(result, "error:")
    data = json.loads(result.stdout)
    assert data["error"] and data["error"] in result.stderr and data["hint"]


def test_chat_on_a_model_without_a_chat_template(tiny_code):
    result = edgekit("run", str(tiny_code), "--chat", "--max-new-tokens", "8", input="hello\nexit\n")
    assert_refused(result, "has no chat template", "tiny-code is not a chat model", "hint:", "--prompt TEXT")
    assert result.stdout == ""
    result = edgekit("run", str(tiny_code), "--chat", "--json", input="hello\n")
    assert_refused(result)
    assert "not a chat model" in json.loads(result.stdout)["error"]
    # What it is for still works.
    assert edgekit("run", str(tiny_code), "--prompt", "def main():", "--max-new-tokens", "4").returncode == 0


def test_chat_says_so_when_a_template_model_answers_blank(tiny_code, tmp_path):
    # An export made before the preset dropped its template (or a base model shipping one).
    copy = tmp_path / "with-template"
    shutil.copytree(tiny_code, copy)
    config = json.loads((copy / "tokenizer_config.json").read_text())
    (copy / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": OLD_TEMPLATE}))
    result = edgekit("run", str(copy), "--chat", "--max-new-tokens", "10", input="hello\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""
    assert "note: the reply is blank: this model may not be instruction-tuned" in result.stderr
    assert "try --prompt TEXT" in result.stderr


def test_chat_that_outgrows_the_context(exported):
    path = exported("LlamaForCausalLM", "ort")
    turns = f"{LONG_TURN}\n{LONG_TURN} again\n"
    result = edgekit("run", str(path), "--chat", "--max-new-tokens", "200", "--json", input=turns)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [t["dropped_messages"] for t in data["turns"]] == [0, 2] and data["turns"][1]["restarted"]
    assert data["cached_tokens"] < 1024
    shown = edgekit("run", str(path), "--chat", "--max-new-tokens", "200", input=turns)
    assert shown.returncode == 0, shown.stderr
    assert "restarted: the 2 oldest messages dropped to fit the context of 1024 tokens" in shown.stderr
    # A message that cannot fit even alone ends the chat with an error; --json keeps the turns done.
    result = edgekit("run", str(path), "--chat", "--max-new-tokens", "8", "--json", input=f"hi\n{LONG_TURN * 3}\n")
    assert_refused(result, "error: the message does not fit:", "exceed the context of 1024 tokens",
                   "hint: send a shorter message, or lower --max-new-tokens")
    data = json.loads(result.stdout)
    assert len(data["turns"]) == 1 and "does not fit" in data["error"]


def test_serve_refuses_the_same_ids_with_the_same_words(exported):
    from starlette.testclient import TestClient

    from edgekit.serve.app import create_app

    client = TestClient(create_app(exported("Qwen3ForCausalLM", "ort")))
    response = client.post("/v1/completions", json={"prompt": [1, -1], "max_tokens": 2})
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message == "prompt token id -1 is outside the vocabulary of 2048 tokens (0..2047)"
    response = client.post("/v1/completions", json={"prompt": [1, 2], "max_tokens": 5000})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("2 prompt tokens + 5000 max_tokens exceed the context of")
