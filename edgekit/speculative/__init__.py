"""Speculative decoding over any runtime session: propose k tokens, verify them in one forward.

    committed text ─proposer.propose→ d1..dk ─session.forward(pending + d1..dk)→ k + 1 logits rows
        ─verify (greedy: longest agreeing prefix; sampling: rejection rule)→ d1..dj + the target's own token
        ─session.rollback→ the cache keeps the committed text; what it could not keep is fed again

One forward per round reads the weights once, whether it checks 1 token or k + 1: on a device
where decode is bound by reading the weights, each accepted proposal is a token for free.

Rollback (``edgekit.runtimes.base``): a KV-only cache on the ``ort`` target drops the rejected rows
by length. A session with fixed-size states (Gated DeltaNet conv + recurrent) or a ping-pong /
concatenated cache returns to the state before the verify step, kept for free (the spare buffer
of the ping-pong, the previous OrtValues), and the kept tokens go into the next round's forward.
That costs no extra call and no copy; keeping the state at every verified position instead would
need the graph to output k + 1 recurrent states per layer (benchmarks/SPECULATIVE.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.generate import Generation, Sampling, step_logits, sample
from edgekit.speculative.base import Proposal, Proposer
from edgekit.speculative.verify import accept_greedy, accept_sampled
from edgekit.types import MTP_LOGITS

DEFAULT_DRAFT_TOKENS = 4
MAX_DRAFT_TOKENS = 32  # a verify returns (k + 1, vocab) logits: 150k x 33 x 4 bytes = 20 MB at most

__all__ = ["DEFAULT_DRAFT_TOKENS", "MAX_DRAFT_TOKENS", "Proposal", "Proposer", "SpeculativeGeneration",
           "check_draft_tokens", "default_draft_tokens", "draft_path", "generate_speculative", "head_rows"]


@dataclass
class SpeculativeGeneration(Generation):
    """A generation with what the proposer contributed."""

    proposed: int = 0  # proposed tokens the target checked
    accepted: int = 0  # of which it kept
    rounds: int = 0  # target forward calls after the prefill

    @property
    def acceptance_rate(self) -> float:
        """Kept proposals per checked proposal."""
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Kept proposals per target forward (each forward also yields one token of the target's own)."""
        return self.accepted / self.rounds if self.rounds else 0.0


def generate_speculative(
    session, prompt_ids: list[int], max_new_tokens: int, proposer: Proposer,
    draft_tokens: int = DEFAULT_DRAFT_TOKENS, sampling: Sampling = Sampling(), eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
) -> SpeculativeGeneration:
    """``edgekit.generate.generate`` with proposals: the same tokens when greedy, the same
    distribution when sampling, in fewer target forwards."""
    if not prompt_ids:
        raise EdgekitError("the prompt is empty", "pass --prompt TEXT or --prompt-ids 1,2,3")
    check_draft_tokens(draft_tokens)
    result = SpeculativeGeneration(prompt_tokens=len(prompt_ids))
    if max_new_tokens <= 0:
        return result
    rng = np.random.default_rng(sampling.seed)
    session.reset(len(prompt_ids) + max_new_tokens + draft_tokens)
    clock = _Clock(result, on_token, eos_ids)
    # As plain generate prefills (a build computes the last row's logits alone); an MTP target's
    # last row of head logits proposes the first token.
    context = [*prompt_ids, sample(step_logits(session, list(prompt_ids)), sampling, rng)]
    proposer.observe(context, 0, head_rows(session, proposer))
    if clock.emit(context[-1:]):
        return result
    while len(result.token_ids) < max_new_tokens:
        room = max_new_tokens - len(result.token_ids) - 1  # the round's own token takes one
        new = _round(session, proposer, context, min(draft_tokens, room), sampling, rng, result)
        context += new
        if clock.emit(new[: max_new_tokens - len(result.token_ids)]):
            break
    return result


def _round(session, proposer: Proposer, context: list[int], k: int, sampling: Sampling,
           rng: np.random.Generator, result: SpeculativeGeneration) -> list[int]:
    """One verify step: the tokens it commits (kept proposals + the target's own)."""
    proposal = proposer.propose(context, k) if k > 0 else Proposal([])
    drafts = proposal.tokens[:k]
    cached = session.length
    pending = context[cached:]  # committed, not yet in the cache: at least the newest token
    session.checkpoint()
    rows = session.forward(pending + drafts)[len(pending) - 1:]  # (len(drafts) + 1, vocab)
    if sampling.greedy:
        kept, token = accept_greedy(rows, drafts)
    else:
        probs = proposal.probs[:k] if proposal.probs is not None else None
        kept, token = accept_sampled(rows, drafts, probs, sampling, rng)
    session.rollback(cached + len(pending) + kept)  # the rest is fed again next round
    new = [*drafts[:kept], token]
    proposer.observe(context + new, cached, head_rows(session, proposer))
    result.proposed += len(drafts)
    result.accepted += kept
    result.rounds += 1
    return new


class _Clock:
    """Streams tokens, times the first and the rest, stops at an end-of-sequence id."""

    def __init__(self, result: Generation, on_token, eos_ids: tuple[int, ...]):
        self.result, self.on_token, self.eos_ids = result, on_token, eos_ids
        self.start = time.perf_counter()
        self.decode_start = 0.0

    def emit(self, tokens: list[int]) -> bool:
        """Record ``tokens``; True when generation is over (an end-of-sequence id)."""
        result = self.result
        now = time.perf_counter()
        for token in tokens:
            if not result.token_ids:
                result.ttft_ms = (now - self.start) * 1000
                self.decode_start = now
            else:
                result.decode_ms = (now - self.decode_start) * 1000
            result.token_ids.append(token)
            if self.on_token is not None:
                self.on_token(token)
            if token in self.eos_ids:
                result.stopped_by = "eos"
                return True
        return False


def head_rows(source, proposer: Proposer):
    """The MTP head rows of ``source``'s last forward (a session, or a serve engine's row 0) for a
    proposer that reads them (``reads_head_rows``), else None without asking: a TensorRT session
    downloads them from the device when they are read."""
    return getattr(source, MTP_LOGITS, None) if getattr(proposer, "reads_head_rows", False) else None


def check_draft_tokens(draft_tokens: int | None, speculative: bool = True, choice: str | None = None) -> None:
    """Refuse ``--draft-tokens`` outside 1..MAX_DRAFT_TOKENS, given without ``--speculative``
    (``speculative`` False), or above 1 for ``mtp``: run, serve and generate_speculative share it."""
    if draft_tokens is None:
        return
    if not speculative:
        raise EdgekitError("--draft-tokens applies with --speculative", "add --speculative ngram (or draft:PATH, draft, mtp)")
    if not 1 <= draft_tokens <= MAX_DRAFT_TOKENS:
        raise EdgekitError(f"--draft-tokens {draft_tokens} is outside 1..{MAX_DRAFT_TOKENS}", "e.g. --draft-tokens 4")
    if choice == "mtp" and draft_tokens != 1:
        raise EdgekitError(f"--draft-tokens {draft_tokens} with --speculative mtp: the MTP head proposes one token "
                           "a round (it runs inside the target's forward)", "drop --draft-tokens")


def default_draft_tokens(choice: str | None) -> int:
    """Tokens a round proposes when ``--draft-tokens`` is not given: 1 for the MTP head, else 4."""
    return 1 if choice == "mtp" else DEFAULT_DRAFT_TOKENS


def draft_path(choice: str) -> str | None:
    """The PATH of ``draft:PATH`` (None for any other choice, ``draft:`` with no path included)."""
    path = choice.removeprefix("draft:")
    return path if choice.startswith("draft:") and path else None


PROPOSER_CHOICES = ("ngram, draft:PATH (an export or build with the same tokenizer), draft (the one a build "
                    "carries: build --draft) or mtp")


def open_proposer(choice: str, session, sampling: Sampling = Sampling(), threads: int | None = None) -> Proposer:
    """The proposer ``--speculative`` names, ready for ``session``'s model."""
    from pathlib import Path

    if choice == "ngram":
        from edgekit.speculative.ngram import NgramProposer

        return NgramProposer()
    if choice == "draft" or draft_path(choice) is not None:
        from edgekit.runtimes.registry import open_engine
        from edgekit.speculative.draft import DraftProposer, check_same_tokenizer

        draft = open_engine(carried_draft(session) if choice == "draft" else Path(draft_path(choice)), threads=threads)
        check_same_tokenizer(session.graph, draft.graph)
        return DraftProposer(draft, sampling, sampling.seed)
    if choice == "mtp":
        from edgekit.speculative.mtp import open_mtp

        return open_mtp(session, sampling)
    raise EdgekitError(f"--speculative {choice!r} is not a proposer", f"use {PROPOSER_CHOICES}")


def carried_draft(session):
    """The draft model inside ``session``'s folder (``build --draft``), or an error saying how to add one."""
    from pathlib import Path

    from edgekit.errors import ArtifactError
    from edgekit.types import DRAFT_FOLDER, SIDECAR

    folder = Path(session.graph.path) / DRAFT_FOLDER
    if not (folder / SIDECAR).is_file():
        raise ArtifactError(f"{session.graph.path} carries no draft model ({folder} is missing)",
                            "build it with one (edgekit build EXPORT --profile P -o OUT --draft DRAFT), "
                            "or pass --speculative draft:PATH")
    return folder
