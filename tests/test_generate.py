"""Sampling and the generation loop, on a deterministic stand-in session."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, generate, sample


class CountingSession:
    """Logits that favour (last token + 1) % vocab; records what it was fed."""

    def __init__(self, vocab=16, delay=0.0):
        self.vocab, self.delay, self.fed = vocab, delay, []

    def reset(self, capacity=0):
        self.fed = []

    def forward(self, token_ids):
        time.sleep(self.delay)
        self.fed.append(list(token_ids))
        logits = np.zeros((len(token_ids), self.vocab), dtype=np.float32)
        logits[-1, (token_ids[-1] + 1) % self.vocab] = 5.0
        return logits


def test_greedy_prefills_once_then_decodes_one_token_a_step():
    session = CountingSession()
    result = generate(session, [1, 2, 3], 5)
    assert result.token_ids == [4, 5, 6, 7, 8]
    assert session.fed == [[1, 2, 3], [4], [5], [6], [7]]


def test_stops_at_eos():
    result = generate(CountingSession(), [1], 10, eos_ids=(4,))
    assert result.token_ids == [2, 3, 4] and result.stopped_by == "eos"


def test_timings_reflect_the_work():
    result = generate(CountingSession(delay=0.02), [1], 6)
    assert result.ttft_ms >= 20
    assert 30 <= result.decode_tokens_per_s <= 55  # 5 steps of >= 20 ms each


def test_sampling_is_seeded_and_respects_top_k():
    logits = np.array([0.0, 1.0, 2.0, 3.0])
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    draws = [sample(logits, Sampling(temperature=1.0, seed=7), r) for r in [rng()] for _ in range(50)]
    again = [sample(logits, Sampling(temperature=1.0, seed=7), r) for r in [rng()] for _ in range(50)]
    assert draws == again and len(set(draws)) > 1
    top2 = {sample(logits, Sampling(temperature=1.0, top_k=2), np.random.default_rng(i)) for i in range(100)}
    assert top2 == {2, 3}
    assert sample(logits, Sampling(top_p=0.1), np.random.default_rng(0)) == 3
    assert sample(logits, Sampling(temperature=0.0), np.random.default_rng(0)) == 3


def test_top_p_keeps_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    picks = {sample(logits, Sampling(top_p=0.7), np.random.default_rng(i)) for i in range(200)}
    assert picks == {0, 1}


@pytest.mark.parametrize("bad", [Sampling(temperature=-1), Sampling(top_k=0), Sampling(top_p=1.5)])
def test_bad_sampling_options_are_refused(bad):
    with pytest.raises(EdgekitError):
        bad.check()


class LastOnlySession(CountingSession):
    """A session that can compute the last position alone (as edgekit's builds can)."""

    def __init__(self):
        super().__init__()
        self.last_calls = 0

    def last_logits(self, token_ids):
        self.last_calls += 1
        return self.forward(token_ids)[-1]


def test_uses_last_logits_when_the_session_has_it():
    session = LastOnlySession()
    result = generate(session, [1, 2, 3], 4)
    assert result.token_ids == [4, 5, 6, 7]
    assert session.last_calls == 4  # the prefill too: only its last row is ever read


def test_prompt_ids_are_checked_against_the_vocabulary():
    from edgekit.generate import token_id_problem

    assert token_id_problem([0, 15], 16) is None
    # -1 would be read as the last row by ONNX Runtime's Gather: refused like any other bad id.
    for bad in (16, -1, 99999):
        assert f"prompt token id {bad} is outside the vocabulary of 16 tokens (0..15)" == token_id_problem([1, bad], 16)


def test_prompt_and_new_tokens_are_checked_against_the_context():
    from edgekit.generate import check_prompt, context_problem

    assert context_problem(10, 6, 16) is None
    assert context_problem(10, 7, 16, "max_tokens") == "10 prompt tokens + 7 max_tokens exceed the context of 16 tokens"
    with pytest.raises(EdgekitError) as info:
        check_prompt([1] * 10, 7, vocab_size=16, context=16)
    assert info.value.hint == "use --max-new-tokens 6 or less, or a shorter prompt"
    with pytest.raises(EdgekitError) as info:
        check_prompt([1] * 16, 1, vocab_size=16, context=16)
    assert info.value.hint == "use a shorter prompt"
