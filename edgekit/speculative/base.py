"""What a proposer is: it guesses the next tokens; the target verifies them in one forward.

    proposer.propose(context, k) -> Proposal     up to k tokens after ``context`` (the committed text)
    proposer.observe(context, first, rows)       after each target forward: the committed text now,
                                                 and that forward's MTP head rows from position ``first``
                                                 (None unless the target runs the head: export --mtp);
                                                 ``first == 0``: a new sequence (after the prefill), so
                                                 a proposer reused across generations starts afresh
    proposer.close()                             optional
    proposer.reads_head_rows                     optional, True for a proposer that reads the MTP head's
                                                 rows: only then are they fetched (``head_rows``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class Proposal:
    """Proposed token ids and, for a sampling proposer, the distribution each was drawn from."""

    tokens: list[int]
    probs: list[np.ndarray] | None = None  # one (vocab,) row per token; None: a point mass (greedy, lookup)


class Proposer(Protocol):
    """Anything that proposes tokens (edgekit.speculative.ngram, draft, mtp)."""

    def propose(self, context: list[int], k: int) -> Proposal: ...

    def observe(self, context: list[int], first_position: int, rows: np.ndarray | None) -> None: ...
