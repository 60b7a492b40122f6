"""The legacy /v1/completions surface that evaluation harnesses use: prompt lists, token-id prompts,
n, echo, logprobs (checked against a teacher-forced forward), scoring with max_tokens 0, refusals."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from tests.serve.conftest import API_KEY
from tests.serve.test_server import reference

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def post(live, body: dict) -> httpx.Response:
    return httpx.post(f"{live.url}/completions", json=body, headers=HEADERS, timeout=60)


def teacher_forced(folder, ids: list[int]) -> np.ndarray:
    """log p(next | prefix) at every position of ``ids``, (S, vocab), from a fresh batch-1 session."""
    from edgekit.runtimes.registry import open_engine

    session = open_engine(folder, threads=1)
    session.reset(len(ids))
    logits = session.forward(ids).astype(np.float64)  # (S, vocab)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def test_token_id_lists_one_choice_each_in_order(live, tiny_export):
    prompts = [[15, 16, 17, 18], [200, 201], [7] * 6]
    out = post(live, {"prompt": prompts, "max_tokens": 5, "temperature": 0, "return_token_ids": True}).json()
    assert [c["index"] for c in out["choices"]] == [0, 1, 2]
    for ids, choice in zip(prompts, out["choices"]):
        assert choice["token_ids"] == reference(tiny_export, ids, 5)
    assert out["usage"]["prompt_tokens"] == sum(map(len, prompts))


def test_text_prompts_with_n_are_indexed_prompt_times_n(live, tiny_export):
    tok = live.app.state.server.tokenizer
    body = {"prompt": ["def f(x):", "class A:"], "n": 2, "max_tokens": 4, "temperature": 0, "return_token_ids": True}
    out = post(live, body).json()
    choices = sorted(out["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    for i, prompt in enumerate(body["prompt"]):
        expected = reference(tiny_export, tok.encode(prompt), 4)
        assert choices[2 * i]["token_ids"] == choices[2 * i + 1]["token_ids"] == expected
    assert out["usage"]["completion_tokens"] == sum(len(c["token_ids"]) for c in choices)


def test_seeded_n_choices_differ_and_repeat(live):
    body = {"prompt": "x = ", "n": 3, "max_tokens": 8, "temperature": 1.5, "seed": 11}
    first = [c["text"] for c in post(live, body).json()["choices"]]
    assert first == [c["text"] for c in post(live, body).json()["choices"]]
    assert len(set(first)) > 1, first


def test_echo_scoring_equals_teacher_forced(live, tiny_export):
    prompt = [40, 41, 42, 43, 44, 45, 46, 47]
    out = post(live, {"prompt": [prompt], "max_tokens": 0, "echo": True, "logprobs": 3}).json()
    choice = out["choices"][0]
    lp = choice["logprobs"]
    tok = live.app.state.server.tokenizer
    assert choice["text"] == tok.decode(prompt) and out["usage"]["completion_tokens"] == 0
    assert lp["tokens"] == [tok.decode([i], skip_special_tokens=False) for i in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    expected = teacher_forced(tiny_export, prompt)
    for pos in range(1, len(prompt)):
        assert lp["token_logprobs"][pos] == pytest.approx(expected[pos - 1, prompt[pos]], abs=1e-4)
        top = lp["top_logprobs"][pos]
        assert len(top) == 3 and max(top.values()) == pytest.approx(expected[pos - 1].max(), abs=1e-4)
    offsets = lp["text_offset"]
    assert offsets[0] == 0 and offsets == sorted(offsets)
    assert offsets[-1] == len(choice["text"]) - len(lp["tokens"][-1])


def test_echo_with_generation_scores_prompt_and_new_tokens(live, tiny_export):
    prompt = [300, 301, 302, 303]
    body = {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "temperature": 0, "return_token_ids": True}
    choice = post(live, body).json()["choices"][0]
    generated = choice["token_ids"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) + len(generated)
    whole = prompt + generated
    expected = teacher_forced(tiny_export, whole)
    got = lp["token_logprobs"]
    for pos in range(1, len(whole)):
        assert got[pos] == pytest.approx(expected[pos - 1, whole[pos]], abs=1e-4), pos
    for pos in range(len(prompt), len(whole)):  # greedy: each generated token is its position's best
        assert got[pos] == pytest.approx(max(lp["top_logprobs"][pos].values()), abs=1e-9)


def test_streamed_echo_and_logprobs_equal_the_whole(live):
    body = {"prompt": "for i in", "max_tokens": 6, "echo": True, "logprobs": 2, "temperature": 0}
    whole = post(live, body).json()["choices"][0]
    with httpx.stream("POST", f"{live.url}/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=60) as response:
        import json

        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    parts = [c["choices"][0] for c in chunks]
    assert "".join(p["text"] for p in parts) == whole["text"] and whole["text"].startswith("for i in")
    tokens = [t for p in parts if p["logprobs"] for t in p["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"]
    offsets = [t for p in parts if p["logprobs"] for t in p["logprobs"]["text_offset"]]
    assert offsets == whole["logprobs"]["text_offset"]


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": "x", "best_of": 3}, "best_of", "must equal n"),
    ({"prompt": "x", "suffix": "tail"}, "suffix", "not supported"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens", "with echo"),
    ({"prompt": "x", "logprobs": 21}, "logprobs", "less than or equal to 20"),
    ({"prompt": [], "max_tokens": 2}, "prompt", "empty"),
    ({"prompt": [[1, 2], []]}, "prompt", "empty"),
    ({"prompt": [[1, 10**7]]}, "prompt", "outside the vocabulary"),
    ({"prompt": ["a"] * 40, "n": 2}, "n", "exceed the limit"),
])
def test_unsupported_or_bad_legacy_fields_get_a_clear_400(live, body, param, words):
    response = post(live, body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_best_of_equal_to_n_is_served(live):
    out = post(live, {"prompt": "a", "n": 2, "best_of": 2, "max_tokens": 2, "temperature": 0}).json()
    assert len(out["choices"]) == 2


def test_streamed_prompt_list_with_n_carries_each_choice_index(live):
    body = {"prompt": ["a = ", "b = "], "n": 2, "max_tokens": 5, "temperature": 1.0, "seed": 2}
    whole = {c["index"]: c["text"] for c in post(live, body).json()["choices"]}
    texts = {i: "" for i in range(4)}
    with httpx.stream("POST", f"{live.url}/completions", json={**body, "stream": True}, headers=HEADERS,
                      timeout=60) as response:
        import json

        for line in response.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                texts[choice["index"]] += choice["text"]
    assert texts == whole
