"""The model's own multi-token-prediction head as the proposer (Qwen3.5/3.6: ``edgekit export --mtp``).

    target forward ─hidden rows h_p (its final norm's output)─┐
    committed tokens x_{p+1} ─────────────────────────────────┴─ MTP graph (own KV cache, a row per position)
        └─ logits of x_{p+2}: the first proposal; its hidden row + that token chain the next (k > 1)

After each verify step the head is fed the pairs (h_p, x_{p+1}) of the newly committed positions
(one forward), so its cache matches the target's text; chained rows are rolled back.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgekit.errors import ArtifactError
from edgekit.generate import Sampling, distribution
from edgekit.speculative.base import HIDDEN_INPUT, HIDDEN_OUTPUT, MTP_FOLDER, Proposal


def open_mtp(session, sampling: Sampling = Sampling(), threads: int | None = None) -> "MtpProposer":
    """The MTP proposer of ``session``'s export, or an error saying how to export one."""
    from edgekit.runtimes.registry import open_engine

    folder = Path(session.graph.path) / MTP_FOLDER
    hint = "export the Qwen3.5/3.6 checkpoint with its head: edgekit export MODEL -o DIR --mtp"
    if not (folder / "edgekit.json").is_file():
        raise ArtifactError(f"{session.graph.path} has no MTP head ({folder} is missing)", hint)
    if HIDDEN_OUTPUT not in {t.name for t in session.graph.outputs} or not hasattr(session, "hidden"):
        raise ArtifactError(f"{session.graph.path} does not output its hidden states, which the MTP head reads "
                            "(MTP runs on ONNX Runtime sessions, of an export or a build)", hint)
    # The head's folder is an ordinary export (one attention layer): it runs as an ort-cpu engine.
    return MtpProposer(open_engine(folder, threads=threads), sampling, sampling.seed)


class MtpProposer:
    """Propose with the MTP graph's ``session`` (an OrtSession that takes ``target_hidden_states``)."""

    def __init__(self, session, sampling: Sampling = Sampling(), seed: int | None = None):
        self.session, self.sampling = session, sampling
        self.restart(sampling, seed)
        self.fed = 0  # target positions whose pair (h_p, x_{p+1}) is in the head's cache
        self.logits: np.ndarray | None = None  # the head's prediction for the next token
        self.hidden: np.ndarray | None = None  # and its hidden row, for chaining
        session.reset()

    def restart(self, sampling: Sampling, seed: int | None = None) -> None:
        """Sample as ``sampling`` from a stream of ``seed`` (not the target's: seed + 2); serve calls
        it for each request, so a seeded request proposes the same tokens every time."""
        self.sampling = sampling
        self.rng = np.random.default_rng(None if seed is None else seed + 2)

    def observe(self, context: list[int], first_position: int, hidden: np.ndarray | None) -> None:
        """Feed the head the pairs of positions it has not seen whose next token is committed."""
        if hidden is None:
            raise ArtifactError("the target returned no hidden states for the MTP head", "re-export with --mtp")
        if first_position == 0:  # a new generation: a reused proposer (bench runs) forgets the last one
            self.session.reset()
            self.fed, self.logits, self.hidden = 0, None, None
        elif self.session.length != self.fed:  # chained rows of the last proposal
            self.session.rollback(self.fed)
        last = len(context) - 2  # the newest pair: (h of the token before the newest, the newest)
        start = max(self.fed, first_position)
        stop = min(last, first_position + len(hidden) - 1)
        if stop < start:
            return
        rows = hidden[start - first_position: stop - first_position + 1]  # (n, H)
        ids = context[start + 1: stop + 2]
        logits = self.session.forward(ids, {HIDDEN_INPUT: rows[None].astype(np.float32)})
        self.fed = stop + 1
        self.logits, self.hidden = logits[-1], self.session.hidden[-1]

    def propose(self, context: list[int], k: int) -> Proposal:
        """The head's token for the next position, then chained ones (its own hidden row each time)."""
        if self.logits is None or self.fed != len(context) - 1 or k <= 0:
            return Proposal([])
        if not self.session.rollback_in_place:
            k = min(k, 2)  # one chained forward: what a rollback can undo on this session
        tokens, probs = [], []
        logits, hidden = self.logits, self.hidden
        self.session.checkpoint()
        for i in range(k):
            token, p = self._pick(logits)
            tokens.append(token)
            probs.append(p)
            if i + 1 < k:
                logits = self.session.forward([token], {HIDDEN_INPUT: hidden[None, None].astype(np.float32)})[-1]
                hidden = self.session.hidden[-1]
        return Proposal(tokens, None if self.sampling.greedy else probs)

    def _pick(self, logits: np.ndarray) -> tuple[int, np.ndarray | None]:
        if self.sampling.greedy:
            return int(np.argmax(logits)), None
        p = distribution(logits, self.sampling)
        return int(self.rng.choice(p.size, p=p)), p

    def close(self) -> None:
        self.session.close()
