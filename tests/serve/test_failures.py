"""Requests that fail or meet an edge are answered, and leave the others alone: a row whose sampling
fails, a submit during shutdown, a conversation that fills the context, a tokenizer llguidance cannot
read, top_logprobs without logprobs. Logprob offsets and bytes over characters split across tokens."""

from __future__ import annotations

import json
import queue
import shutil

import httpx
import numpy as np
import pytest

from edgekit.generate import Sampling
from edgekit.serve.engine import serving_engine
from edgekit.serve.logprobs import Entry, Formatter
from edgekit.serve.scheduler import Job, Scheduler
from edgekit.types import ExportedGraph
from tests.serve.conftest import API_KEY, LiveServer

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
SPLIT = "x = 'café ü'"  # é and ü are two byte-level tokens each in the preset tokenizer


class DeadEnd:
    """A logits processor that forbids every token from its ``after``-th step on (a grammar at a dead
    end): sampling such a row fails (all -inf: a NaN distribution)."""

    def __init__(self, after: int):
        self.after, self.steps = after, 0

    def mask(self, logits: np.ndarray) -> np.ndarray:
        self.steps += 1
        return logits if self.steps <= self.after else np.full_like(logits, -np.inf)

    def accept(self, token: int) -> None:
        pass


def post(live, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/{path}", json=body, headers=HEADERS, timeout=60)


@pytest.mark.parametrize("after", [0, 2], ids=["at-join", "mid-decode"])
def test_a_row_whose_sampling_fails_is_answered_and_the_others_complete(tiny_export, after):
    """The failing job is first of a batch that prefills together (at-join), or fails in a decode step
    shared with the others (mid-decode): only it ends, with an error; the scheduler goes on."""
    engine, _ = serving_engine(ExportedGraph.load(tiny_export), max_batch=4, max_context=64, threads=1)
    events: queue.Queue = queue.Queue()

    def job(tag: int, prompt: list[int], processor=None) -> Job:
        return Job(prompt, 5, Sampling(temperature=1.0, seed=tag), (), [], None,
                   lambda event: events.put((tag, event)), processor=processor)

    jobs = [job(0, [15, 16, 17], DeadEnd(after)), job(1, [20, 21]), job(2, [30, 31, 32, 33])]
    scheduler = Scheduler(engine)
    for j in jobs:  # queued before the loop starts, so the three join in one prefill
        scheduler.submit(j)
    scheduler.start()
    try:
        finals = _finals(events, 3)
        assert finals[0].finish_reason == "error" and "NaN" in finals[0].error
        assert [finals[t].finish_reason for t in (1, 2)] == ["length", "length"]
        assert [len(jobs[t].token_ids) for t in (1, 2)] == [5, 5]
        later = job(3, [40, 41])
        scheduler.submit(later)
        assert _finals(events, 1)[3].finish_reason == "length"
    finally:
        scheduler.stop()


def _finals(events: queue.Queue, count: int) -> dict:
    """The final event of ``count`` jobs by tag; fails if one is never answered."""
    finals: dict = {}
    while len(finals) < count:
        try:
            tag, event = events.get(timeout=60)
        except queue.Empty:
            raise AssertionError(f"jobs left unanswered; answered: {sorted(finals)}") from None
        if event.finish_reason is not None:
            assert tag not in finals, f"job {tag} answered twice"
            finals[tag] = event
    return finals


def test_a_job_submitted_after_stop_is_answered(tiny_export):
    engine, _ = serving_engine(ExportedGraph.load(tiny_export), max_batch=2, max_context=64, threads=1)
    scheduler = Scheduler(engine).start()
    scheduler.stop()
    events: list = []
    scheduler.submit(Job([15, 16], 3, Sampling(temperature=0), (), [], None, events.append))
    assert [e.finish_reason for e in events] == ["error"] and "shutting down" in events[0].error


def test_a_conversation_filling_the_context_without_max_tokens_is_400(live):
    messages = [{"role": "user", "content": "word " * 300}]  # > 256 tokens, live's context
    response = post(live, "chat/completions", {"model": "m", "messages": messages})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"


def test_top_logprobs_without_logprobs_is_400(live):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2, "max_tokens": 2}
    response = post(live, "chat/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "top_logprobs"


def _clean(token: str) -> bool:
    return "\ufffd" not in token and not token.startswith("<|")


def test_text_offsets_follow_characters_split_across_byte_tokens(live):
    tok = live.app.state.server.tokenizer
    pieces = [tok.decode([i]) for i in tok.encode(SPLIT)]
    assert pieces.count("\ufffd") == 4, pieces  # the case this test is about: é and ü split in two
    body = {"model": "m", "prompt": SPLIT, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = post(live, "completions", body).json()["choices"][0]
    text, tokens, offsets = choice["text"], choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert text == SPLIT and offsets == sorted(offsets)
    for token, offset in zip(tokens, offsets):
        if _clean(token):
            assert text[offset:offset + len(token)] == token, (token, offset)
    halves = [o for t, o in zip(tokens, offsets) if t == "\ufffd"]
    assert halves == [text.index("é")] * 2 + [text.index("ü")] * 2


def test_text_offsets_without_echo_start_after_the_prompt(live):
    body = {"model": "m", "prompt": SPLIT, "max_tokens": 4, "logprobs": 1, "temperature": 0}
    choice = post(live, "completions", body).json()["choices"][0]
    whole, lp = SPLIT + choice["text"], choice["logprobs"]
    assert lp["text_offset"][0] == len(SPLIT)
    for token, offset in zip(lp["tokens"], lp["text_offset"]):
        if _clean(token):
            assert whole[offset:offset + len(token)] == token, (token, offset)


def test_echoed_token_ids_keep_special_tokens_as_the_logprob_tokens_do(live):
    tok = live.app.state.server.tokenizer
    start = tok.token_id("<|im_start|>")
    prompt = [start, *tok.encode("user\nhi")]
    body = {"model": "m", "prompt": prompt, "max_tokens": 0, "echo": True, "logprobs": 0}
    choice = post(live, "completions", body).json()["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert choice["text"] == "".join(tokens) == "<|im_start|>user\nhi"
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]


def test_chat_logprob_bytes_are_each_tokens_own(tiny_export):
    from edgekit.tokenizer import load_tokenizer

    tok = load_tokenizer(ExportedGraph.load(tiny_export))
    ids = tok.encode("é ü")
    content = Formatter(tok).chat([Entry(i, -1.0, [(i, -1.0)]) for i in ids])["content"]
    assert b"".join(bytes(item["bytes"]) for item in content) == "é ü".encode()
    assert content[0]["bytes"] == content[0]["top_logprobs"][0]["bytes"] == list("é".encode()[:1])


def test_a_tokenizer_llguidance_cannot_read_is_501_naming_response_format(tiny_export, tmp_path):
    pytest.importorskip("llguidance")
    folder = tmp_path / "export"
    shutil.copytree(tiny_export, folder)
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["decoder"] = None  # tokenizers still loads it; llguidance cannot tell how tokens decode
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
            "response_format": {"type": "json_object"}}
    with LiveServer(folder, max_batch=2, max_context=128, api_key=API_KEY, threads=1) as server:
        response = post(server, "chat/completions", body)
        assert response.status_code == 501, response.text
        error = response.json()["error"]
        assert error["param"] == "response_format" and "tokenizer.json" in error["message"]
        plain = post(server, "chat/completions", {**body, "response_format": None})
        assert plain.status_code == 200, plain.text


def test_a_grammar_that_leaves_no_token_is_a_clear_error(tiny_export):
    """Here the row is narrower than the tokens the grammar needs ('{' is past id 16): the mask is
    empty, and the error says so instead of sampling a NaN distribution."""
    pytest.importorskip("llguidance")
    from edgekit.errors import EdgekitError
    from edgekit.serve.grammar import GrammarTokens, response_format_grammar

    tokens = GrammarTokens((tiny_export / "tokenizer.json").read_text(), 2048, (0,))
    constraint = tokens.constraint(response_format_grammar({"type": "json_object"}), "response_format")
    assert np.isfinite(constraint.mask(np.zeros(2048, np.float32))).any()
    with pytest.raises(EdgekitError, match="allows no next token"):
        constraint.mask(np.zeros(16, np.float32))
