"""Greedy speculative decoding gives exactly plain greedy's tokens, on real tiny exports.

Every runtime path of rollback runs here: the ``ort`` target's shared KV buffer (rows dropped by
length), the ``portable`` target's concatenated cache, Gated DeltaNet's ping-pong states (both
return to the checkpoint and feed the kept tokens again), and the TensorRT session's stepping
code on ONNX Runtime CPU (tests/runtimes/test_tensorrt_session.py's executor).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from edgekit.generate import generate
from edgekit.runtimes.registry import open_engine
from edgekit.speculative import generate_speculative
from edgekit.speculative.draft import DraftProposer
from edgekit.speculative.ngram import NgramProposer
from tests.runtimes.test_tensorrt_session import open_plan
from tests.speculative.proposers import WrongEveryThird

PROMPT = [3, 17, 42, 7, 99, 100, 5, 64, 12, 8, 250, 31, 77]
NEW = 24
GRAPHS = [(arch, target) for arch in ("Qwen3ForCausalLM", "LlamaForCausalLM", "Qwen3_5ForCausalLM")
          for target in ("ort", "portable")]


@pytest.fixture(scope="module")
def plain(exported):
    made = {}

    def reference(arch, target):
        if (arch, target) not in made:
            session = open_engine(exported(arch, target))
            made[arch, target] = (session, generate(session, PROMPT, NEW).token_ids)
        return made[arch, target]

    return reference


@pytest.mark.parametrize("arch,target", GRAPHS)
def test_oracle_rounds_keep_every_prefix_length_and_match_plain(plain, arch, target):
    session, reference = plain(arch, target)
    result = generate_speculative(session, PROMPT, NEW, WrongEveryThird(reference, len(PROMPT)), 4)
    assert result.token_ids == reference
    assert 0 < result.accepted < result.proposed  # both partial acceptance and rejection happened
    assert result.rounds < NEW - 1


@pytest.mark.parametrize("arch,target", GRAPHS)
def test_prompt_lookup_matches_plain(plain, arch, target):
    session, reference = plain(arch, target)
    prompt = PROMPT + reference[:6] + PROMPT  # repeats: lookup proposes (random weights rarely agree)
    expected = generate(session, prompt, NEW).token_ids
    assert generate_speculative(session, prompt, NEW, NgramProposer(), 3).token_ids == expected


@pytest.mark.parametrize("arch,target", [("Qwen3ForCausalLM", "ort"), ("Qwen3_5ForCausalLM", "portable")])
def test_a_draft_model_matches_plain(plain, exported, arch, target):
    session, reference = plain(arch, target)
    same = DraftProposer(open_engine(exported(arch, target)))  # the target itself: every proposal kept
    result = generate_speculative(session, PROMPT, NEW, same, 4)
    assert result.token_ids == reference and result.acceptance_rate == 1.0
    other = "Qwen3_5ForCausalLM" if arch == "Qwen3ForCausalLM" else "LlamaForCausalLM"
    draft = DraftProposer(open_engine(exported(other, "ort")))  # another model: mostly rejected
    assert generate_speculative(session, PROMPT, NEW, draft, 3).token_ids == reference


@pytest.mark.parametrize("arch", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_tensorrt_session_rollback_matches_plain(exported, arch):
    from edgekit.profiles import ShapeRange, load_profile

    profile = dataclasses.replace(load_profile("l4"), shapes={
        "batch": ShapeRange(1, 1, 1), "prompt": ShapeRange(1, 8, 16), "context": ShapeRange(1, 48, 64)})
    session, _ = open_plan(exported(arch, "portable"), profile)
    reference = generate(session, PROMPT, NEW).token_ids
    result = generate_speculative(session, PROMPT, NEW, WrongEveryThird(reference, len(PROMPT)), 4)
    assert result.token_ids == reference and 0 < result.accepted < result.proposed


@pytest.mark.parametrize("arch,target", [("Qwen3ForCausalLM", "ort"), ("Qwen3_5ForCausalLM", "ort"),
                                         ("Qwen3ForCausalLM", "portable")])
def test_rollback_leaves_the_cache_as_if_the_rejected_tokens_never_came(plain, arch, target):
    session, _ = plain(arch, target)
    session.reset()
    session.forward(PROMPT)
    session.checkpoint()
    session.forward([1, 2, 3, 4])
    held = session.rollback(len(PROMPT) + 1)
    expected = len(PROMPT) + 1 if session.rollback_in_place else len(PROMPT)
    assert held == expected == session.length
    after = session.forward([1, 9][held - len(PROMPT):])
    session.reset()
    fresh = session.forward(PROMPT + [1, 9])
    np.testing.assert_allclose(after[-1], fresh[-1], atol=1e-4)


class Counting:
    """A draft session that counts the tokens it is fed (everything else is the real session's)."""

    def __init__(self, session):
        self.session, self.fed = session, 0

    def __getattr__(self, name):
        return getattr(self.session, name)

    def forward(self, ids):
        self.fed += len(ids)
        return self.session.forward(ids)

    def last_logits(self, ids):
        self.fed += len(ids)
        return self.session.last_logits(ids)


@pytest.mark.parametrize("draft_arch,draft_target", [("Qwen3_5ForCausalLM", "ort"), ("LlamaForCausalLM", "portable"),
                                                     ("LlamaForCausalLM", "ort")])
def test_a_reused_draft_rolls_back_without_re_prefilling(plain, exported, draft_arch, draft_target):
    """A mostly rejected draft, reused for three generations (as bench reuses it): plain greedy's tokens
    each time, and the draft is fed each committed token about once (rejections cost no re-prefill)."""
    session, reference = plain("Qwen3ForCausalLM", "ort")
    counting = Counting(open_engine(exported(draft_arch, draft_target)))
    draft = DraftProposer(counting)
    for _ in range(3):
        counting.fed = 0
        result = generate_speculative(session, PROMPT, NEW, draft, 3)
        assert result.token_ids == reference
        assert result.accepted < result.proposed  # rejections happened
        assert counting.fed <= len(PROMPT) + NEW + 3 * result.rounds, counting.fed
