"""Chat: state carried between turns, each turn prefilling only its own tokens, same tokens as a
fresh session fed the whole conversation."""

from __future__ import annotations

import pytest

from edgekit.chat import Conversation, load_chat_template
from edgekit.generate import generate
from edgekit.runtimes.registry import open_engine
from edgekit.tokenizer import load_tokenizer


@pytest.mark.parametrize("architecture", ["Qwen3_5ForCausalLM", "LlamaForCausalLM"])
def test_turns_continue_the_cache(exported, architecture):
    path = exported(architecture, "ort")
    session = open_engine(path)
    tokenizer = load_tokenizer(session.graph, required=True)
    chat = Conversation(session, tokenizer, load_chat_template(session.graph), max_new_tokens=8)
    first = chat.send("def add(a, b):")
    held = session.length
    history = list(chat.ids)
    second = chat.send("and now subtract")
    assert not second.restarted and first.prefilled_tokens > 0
    # Only the new turn is prefilled: the previous reply's last token plus the new user turn.
    assert session.length == held + second.prefilled_tokens + len(second.generation.token_ids) - 1
    assert second.prefilled_tokens < session.length // 2
    assert chat.ids[: len(history)] == history and len(chat.ids) == session.length
    # A fresh session fed the whole conversation at once generates the same second reply.
    prompt = chat.ids[: held + second.prefilled_tokens]
    again = generate(open_engine(path), prompt, len(second.generation.token_ids), eos_ids=chat.stop_ids)
    assert again.token_ids == second.generation.token_ids


def test_missing_template_is_an_error(exported, tmp_path):
    import shutil

    from edgekit.errors import ArtifactError
    from edgekit.types import ExportedGraph

    copy = tmp_path / "copy"
    shutil.copytree(exported("Qwen3ForCausalLM", "ort"), copy)
    (copy / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="no chat template"):
        load_chat_template(ExportedGraph.load(copy))


def test_cli_chat_reads_turns_from_stdin(exported):
    import json
    import subprocess
    import sys

    path = exported("Qwen3_5ForCausalLM", "ort")
    done = subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", "run", str(path), "--chat",
                           "--max-new-tokens", "6", "--json"], input="hello there\nwhat next?\nexit\n",
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["turns"]) == 2
    first, second = data["turns"]
    generated = len(first["token_ids"]) + len(second["token_ids"])
    # Each turn's last generated token is fed with the next turn (it is part of that turn's prefill).
    assert data["cached_tokens"] == first["prefilled_tokens"] + second["prefilled_tokens"] + generated - 2
    # The second turn did not prefill the first one again.
    assert second["prefilled_tokens"] <= data["cached_tokens"] - first["prefilled_tokens"] - len(second["token_ids"]) + 1


LONG_TURN = "def add(a, b): return a + b; " * 38  # about 450 tokens: two of them and a reply outgrow 1024


def test_a_turn_that_outgrows_the_context_drops_the_oldest_exchange(exported):
    path = exported("LlamaForCausalLM", "ort")
    session = open_engine(path)
    tokenizer = load_tokenizer(session.graph, required=True)
    chat = Conversation(session, tokenizer, load_chat_template(session.graph), max_new_tokens=200)
    context = session.graph.model.max_position_embeddings
    # One turn and its 200 new tokens fit the context; two do not, whatever the first reply's length.
    assert (context - 200) // 2 < len(tokenizer.encode(LONG_TURN)) < context - 200 - 16
    first = chat.send(LONG_TURN)
    assert not first.restarted and first.dropped == 0
    second = chat.send(LONG_TURN + " again")
    # The first exchange (its message and reply) is gone; the second is prefilled from scratch.
    assert second.restarted and second.dropped == 2
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]
    assert chat.messages[0]["content"] == LONG_TURN + " again"
    assert session.length == len(chat.ids) == second.prefilled_tokens + len(second.generation.token_ids) - 1
    assert session.length + 1 <= context
    # Same reply as a fresh session fed the remaining conversation alone.
    again = generate(open_engine(path), chat.ids[: second.prefilled_tokens], 200, eos_ids=chat.stop_ids)
    assert again.token_ids == second.generation.token_ids


def test_a_message_too_long_for_the_context_is_refused_and_not_kept(exported):
    from edgekit.errors import EdgekitError

    path = exported("LlamaForCausalLM", "ort")
    session = open_engine(path)
    chat = Conversation(session, load_tokenizer(session.graph, required=True), load_chat_template(session.graph),
                        max_new_tokens=8)
    chat.send("hello")
    before, held = list(chat.messages), session.length
    with pytest.raises(EdgekitError):
        chat.send(LONG_TURN * 3)
    assert chat.messages == before and session.length == held
    assert chat.send("and now?").restarted is False  # the conversation goes on from its cache
