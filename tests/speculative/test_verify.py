"""The acceptance rules and the generator loop, on a small Markov chain whose distributions are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, generate
from edgekit.speculative import Proposal, generate_speculative
from edgekit.speculative.ngram import NgramProposer
from edgekit.speculative.verify import accept_greedy, accept_sampled
from tests.speculative.proposers import WrongEveryThird

VOCAB = 4


def chain(seed):
    """Logits (VOCAB, VOCAB): row t scores the token after t."""
    return np.random.default_rng(seed).normal(0, 1.5, (VOCAB, VOCAB)).astype(np.float32)


class MarkovSession:
    """A cache that is the token list itself; logits depend on the last token and, with ``history``,
    on every cached token (so a rollback that keeps a wrong token or length changes what follows).

    Keeps one forward of history like the ping-pong sessions do, so rollback returns to the
    checkpoint and the generator must feed the kept tokens again.
    """

    rollback_in_place = False

    def __init__(self, table, history=0.0):
        self.table, self.history, self.tokens, self.calls = table, history, [], 0
        self._mark = (0, 0)

    @property
    def length(self):
        return len(self.tokens)

    def reset(self, capacity=0):
        self.tokens, self.calls = [], 0

    def forward(self, ids):
        self.tokens += list(ids)
        self.calls += 1
        return np.stack([row_logits(self.table, self.tokens[:i + 1], self.history)
                         for i in range(len(self.tokens) - len(ids), len(self.tokens))])

    def checkpoint(self):
        self._mark = (len(self.tokens), self.calls)

    def rollback(self, length):
        marked, calls = self._mark
        assert marked <= length <= len(self.tokens)
        if length == len(self.tokens):
            return length
        if self.rollback_in_place:
            del self.tokens[length:]
            return length
        assert self.calls - calls == 1, "rolled back over more than one forward"
        del self.tokens[marked:]
        return marked


class InPlaceMarkovSession(MarkovSession):
    """Drops rows by length over any number of forwards, like the ``ort`` target's shared KV buffer."""

    rollback_in_place = True


def row_logits(table, history, weight):
    """The logits after ``history``: the chain's row of its last token, shifted by a hash of all of it."""
    mix = sum((i + 1) * (t + 1) for i, t in enumerate(history))  # any change to a cached token changes it
    shift = np.cos(np.arange(VOCAB) * 1.7 + mix * 0.9).astype(np.float32)
    return table[history[-1]] + weight * shift


class MarkovDraft:
    """Samples proposals from another chain and reports their probabilities."""

    def __init__(self, table, sampling, seed):
        self.table, self.sampling, self.rng = table, sampling, np.random.default_rng(seed)

    def propose(self, context, k):
        from edgekit.generate import distribution

        tokens, probs, last = [], [], context[-1]
        for _ in range(k):
            p = distribution(self.table[last], self.sampling)
            last = int(self.rng.choice(VOCAB, p=p))
            tokens.append(last)
            probs.append(p)
        return Proposal(tokens, probs)

    def observe(self, context, first, hidden):
        pass


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def test_greedy_rule_keeps_the_agreeing_prefix_and_adds_the_targets_token():
    rows = np.eye(5)[[1, 2, 3, 4]]  # argmax 1, 2, 3, 4
    assert accept_greedy(rows, [1, 2, 0]) == (2, 3)
    assert accept_greedy(rows, [1, 2, 3]) == (3, 4)
    assert accept_greedy(rows, [0, 2, 3]) == (0, 1)


@pytest.mark.parametrize("point_mass", [False, True])
def test_sampled_rule_emits_the_targets_distribution(point_mass):
    """The first emitted token is distributed as p whatever q proposes (chi-square, 3 dof, p = 0.001)."""
    p_logits, q = np.array([2.0, 0.5, 0.0, -1.0]), np.array([0.1, 0.2, 0.6, 0.1])
    rows = np.stack([p_logits, p_logits])
    sampling, rng, n = Sampling(temperature=1.0), np.random.default_rng(0), 20000
    counts = np.zeros(VOCAB)
    for _ in range(n):
        token = int(rng.choice(VOCAB, p=q)) if not point_mass else 2
        kept, nxt = accept_sampled(rows, [token], None if point_mass else [q], sampling, rng)
        counts[token if kept else nxt] += 1
    expected = softmax(p_logits) * n
    assert ((counts - expected) ** 2 / expected).sum() < 16.3


@pytest.mark.parametrize("session_kind", [MarkovSession, InPlaceMarkovSession])
def test_sampled_generation_follows_the_target(session_kind):
    """Pairs of generated tokens (a 16-outcome joint) match the target, with a draft from another chain;
    the target's logits depend on the whole cache, so a wrong rollback shows in the joint."""
    target, draft_table, weight = chain(1), chain(2), 1.5
    sampling, n = Sampling(temperature=1.0), 3000
    counts = np.zeros((VOCAB, VOCAB))
    session = session_kind(target, weight)
    for seed in range(n):
        sampled = Sampling(temperature=1.0, seed=seed)
        out = generate_speculative(session, [0], 3, MarkovDraft(draft_table, sampling, seed + n), 2, sampled)
        counts[out.token_ids[1], out.token_ids[2]] += 1

    def p(history):
        return softmax(row_logits(target, history, weight))

    joint = sum(p([0])[t0] * p([0, t0])[:, None] * np.stack([p([0, t0, t1]) for t1 in range(VOCAB)])
                for t0 in range(VOCAB))
    expected = joint * n
    assert ((counts - expected) ** 2 / np.maximum(expected, 1e-9)).sum() < 37.7  # 15 dof, p = 0.001


@pytest.mark.parametrize("session_kind", [MarkovSession, InPlaceMarkovSession])
def test_greedy_generation_after_partial_rejections_is_plain_greedy(session_kind):
    """Every prefix length is kept somewhere; logits depend on every cached token, so a rollback that
    kept a rejected token, or lost a kept one, changes the tokens after it."""
    prompt, new = [0, 3, 1], 20
    reference = generate(session_kind(chain(5), 2.0), prompt, new).token_ids
    result = generate_speculative(session_kind(chain(5), 2.0), prompt, new, WrongEveryThird(reference, 3, VOCAB), 3)
    assert result.token_ids == reference
    assert 0 < result.accepted < result.proposed


def test_greedy_generation_is_plain_greedy_in_fewer_forwards():
    table = np.zeros((VOCAB, VOCAB), dtype=np.float32)
    table[np.arange(VOCAB), (np.arange(VOCAB) + 1) % VOCAB] = 3.0  # 0 1 2 3 0 1 ...: lookup predicts it
    plain = generate(MarkovSession(table), [0, 1, 2, 3, 0], 12)
    session = MarkovSession(table)
    spec = generate_speculative(session, [0, 1, 2, 3, 0], 12, NgramProposer(), 4)
    assert spec.token_ids == plain.token_ids
    assert spec.acceptance_rate == 1.0 and session.calls < 12
    assert len(spec.token_ids) == 12


def test_stops_at_eos_inside_an_accepted_run():
    table = np.zeros((VOCAB, VOCAB), dtype=np.float32)
    table[np.arange(VOCAB), (np.arange(VOCAB) + 1) % VOCAB] = 3.0
    spec = generate_speculative(MarkovSession(table), [0, 1, 2, 3, 0], 12, NgramProposer(), 4, eos_ids=(3,))
    assert spec.token_ids == [1, 2, 3] and spec.stopped_by == "eos"


def test_draft_tokens_must_be_positive():
    with pytest.raises(EdgekitError, match="--draft-tokens 0"):
        generate_speculative(MarkovSession(chain(0)), [0], 4, NgramProposer(), 0)
