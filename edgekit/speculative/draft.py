"""A draft model: a smaller export with the same tokenizer proposes tokens one step at a time.

The draft keeps its own cache in step with the committed text: each proposal first feeds the
committed tokens it has not seen (then checkpoints), and after the round it rolls back to the
longest prefix it shares with the text. On a KV-only ``ort`` draft rows drop in place, so it
chains k forwards; a draft that keeps one step of history (fixed states, ping-pong, concatenated
cache) chains at most one forward after the checkpoint, so a rejection returns to the checkpoint
and costs the few tokens after it, never a re-prefill of the whole context.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, distribution, step_logits
from edgekit.speculative.base import Proposal


def check_same_tokenizer(target_graph, draft_graph) -> None:
    """Refuse a draft whose vocabulary or tokenizer differs from the target's (its ids would mean other
    text), or whose context is shorter (it would fail mid-generation where the target still has room)."""
    target, draft = target_graph.model, draft_graph.model
    hint = "use a draft exported from the same model family (the same tokenizer.json), e.g. a smaller size"
    if target.vocab_size != draft.vocab_size:
        raise EdgekitError(f"draft {draft_graph.path} has a vocabulary of {draft.vocab_size} tokens, "
                           f"the target {target.vocab_size}", hint)
    mine, theirs = _tokenizer_digest(target_graph.path), _tokenizer_digest(draft_graph.path)
    if mine is not None and theirs is not None and mine != theirs:
        raise EdgekitError(f"draft {draft_graph.path} has another tokenizer than the target "
                           f"{target_graph.path} (tokenizer.json differs)", hint)
    if draft.max_position_embeddings < target.max_position_embeddings:
        raise EdgekitError(f"draft {draft_graph.path} holds {draft.max_position_embeddings} positions, "
                           f"the target {target_graph.path} {target.max_position_embeddings}",
                           "use a draft with at least the target's context length (max_position_embeddings)")


def _tokenizer_digest(folder: Path) -> str | None:
    path = Path(folder) / "tokenizer.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


class DraftProposer:
    """Propose with ``session`` (a Session on the draft engine), greedy or sampled like the target."""

    def __init__(self, session, sampling: Sampling = Sampling(), seed: int | None = None):
        self.session, self.sampling = session, sampling
        self.restart(sampling, seed)
        self.cached: list[int] = []  # the tokens in the draft's cache
        session.reset()

    def restart(self, sampling: Sampling, seed: int | None = None) -> None:
        """Sample as ``sampling`` from a stream of ``seed`` (not the target's: seed + 1); serve calls
        it for each request, so a seeded request proposes the same tokens every time."""
        self.sampling = sampling
        self.rng = np.random.default_rng(None if seed is None else seed + 1)

    def propose(self, context: list[int], k: int) -> Proposal:
        """Feed what the draft has not seen, checkpoint, then draw ``k`` tokens one forward each."""
        session = self.session
        if not session.rollback_in_place:
            k = min(k, 2)  # one chained forward after the checkpoint: what a rollback can undo here
        tokens, probs = [], []
        feed = context[len(self.cached):]  # observe leaves at least the newest token unseen
        logits = step_logits(session, feed)
        self.cached += feed
        session.checkpoint()  # committed text only: a rollback never goes before it
        for i in range(k):
            if self.sampling.greedy:
                token = int(np.argmax(logits))
            else:
                p = distribution(logits, self.sampling)
                token = int(self.rng.choice(p.size, p=p))
                probs.append(p)
            tokens.append(token)
            if i + 1 < k:
                logits = step_logits(session, [token])
                self.cached.append(token)
        return Proposal(tokens, probs if not self.sampling.greedy else None)

    def observe(self, context: list[int], first_position: int, rows: np.ndarray | None) -> None:
        """Roll the draft's cache back to what it shares with the committed text (a new sequence: empty it)."""
        if first_position == 0:  # a new generation: this proposer may be reused (bench runs, serve)
            self.session.reset()
            self.cached = []
            return
        # Keep the newest token unseen even when the draft already fed it: its logits are the next proposal's.
        shared = min(_common_prefix(self.cached, context), len(context) - 1)
        if shared < len(self.cached):
            held = self.session.rollback(shared)  # shared, or the checkpoint's length (one step of history)
            self.cached = self.cached[:held]

    def close(self) -> None:
        close = getattr(self.session, "close", None)
        if close is not None:
            close()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
