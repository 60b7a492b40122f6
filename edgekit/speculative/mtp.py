"""The model's own multi-token-prediction head as the proposer (Qwen3.5/3.6: ``edgekit export --mtp``).

    target forward of [pending, proposal] ─┬─ logits: verify the proposal (edgekit.speculative)
                                           └─ mtp_logits: the head's guess two tokens ahead of each row
    the row of the newest committed token's predecessor ──▶ the next round's proposal

The head runs inside the target's graph (edgekit.export.mtp), so verifying a proposal and making the
next one is a single forward: on a model whose forward is mostly per-call cost, two calls a round
(target, then head) cost more than the tokens they saved. It proposes one token per round: chaining a
second would need the head's own output at a row only the verify decides. An export with
``--mtp-vocab N`` proposes among the first N ids (row i of ``mtp_logits`` is token i). The row t that proposes
after token t + 1 paired h_t with the target's greedy token at t; greedy decoding commits exactly
that token, so the proposal is the head's on the committed text. A sampled token may differ from it:
the proposal is then the head's guess after another token, and the rejection rule keeps the output
distribution the target's either way (fewer proposals are kept).
"""

from __future__ import annotations

import numpy as np

from edgekit.errors import ArtifactError
from edgekit.generate import Sampling, distribution
from edgekit.speculative.base import Proposal
from edgekit.types import MTP_LOGITS


def open_mtp(session, sampling: Sampling = Sampling()) -> "MtpProposer":
    """The MTP proposer of ``session``'s model, or an error saying how to export one."""
    hint = "export the Qwen3.5/3.6 checkpoint with its head: edgekit export MODEL -o DIR --mtp"
    if MTP_LOGITS not in {t.name for t in session.graph.outputs}:
        raise ArtifactError(f"{session.graph.path} has no MTP head (its graph has no {MTP_LOGITS} output)", hint)
    if not hasattr(session, MTP_LOGITS):
        raise ArtifactError(f"{session.graph.path}: this runtime's sessions do not return the MTP head's logits "
                            "(MTP runs on ONNX Runtime sessions, of an export or a build)", hint)
    return MtpProposer(sampling, sampling.seed, session.graph.model.vocab_size)


class MtpProposer:
    """Propose the head's token for the position after the committed text, from the last forward's rows."""

    reads_head_rows = True  # observe() takes the target's mtp_logits rows (edgekit.speculative.head_rows)

    def __init__(self, sampling: Sampling = Sampling(), seed: int | None = None, vocab: int | None = None):
        self.vocab = vocab  # the target's; an export with --mtp-vocab N proposes among ids 0..N-1 only
        self.logits: np.ndarray | None = None  # the head's prediction for the token after the committed text
        self.at = -1  # the committed length that prediction follows
        self.restart(sampling, seed)

    def restart(self, sampling: Sampling, seed: int | None = None) -> None:
        """Sample as ``sampling`` from a stream of ``seed`` (not the target's: seed + 2); serve calls
        it for each request, so a seeded request proposes the same tokens every time."""
        self.sampling = sampling
        self.rng = np.random.default_rng(None if seed is None else seed + 2)

    def observe(self, context: list[int], first_position: int, rows: np.ndarray | None) -> None:
        """Keep the head's row that predicts the token after ``context`` (``rows``: the last forward's
        ``mtp_logits``, its first row at ``first_position``; after a prefill, ``first_position`` 0: its
        last row). ``rows`` None (a prompt served whole from a prefix cache: no forward yet): nothing to
        propose until the next forward."""
        # the row that pairs h at the newest token's predecessor with the newest token
        if rows is None:
            self.logits = None
        else:
            row = len(rows) - 1 if first_position == 0 else len(context) - 2 - first_position
            self.logits = rows[row] if 0 <= row < len(rows) else None
        self.at = len(context)

    def propose(self, context: list[int], k: int) -> Proposal:
        """The head's token for the next position: one, whatever ``k`` (>= 1) allows."""
        if self.logits is None or self.at != len(context) or k <= 0:
            return Proposal([])
        if self.sampling.greedy:
            return Proposal([int(np.argmax(self.logits))])
        p = distribution(self.logits, self.sampling)
        token = int(self.rng.choice(p.size, p=p))
        if self.vocab is not None and p.size < self.vocab:  # the rejection rule compares full rows
            p = np.pad(p, (0, self.vocab - p.size))
        return Proposal([token], [p])

    def close(self) -> None:
        """Nothing to release: the head is the target's."""
