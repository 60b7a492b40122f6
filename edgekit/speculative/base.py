"""What a proposer is: it guesses the next tokens; the target verifies them in one forward.

    proposer.propose(context, k) -> Proposal     up to k tokens after ``context`` (the committed text)
    proposer.observe(context, first, hidden)     after each target forward: the committed text now,
                                                 and the target's hidden rows from position ``first``
                                                 (None unless the target outputs them: MTP);
                                                 ``first == 0``: a new sequence (after the prefill), so
                                                 a proposer reused across generations starts afresh
    proposer.close()                             optional
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

# The MTP contract, shared by its export (edgekit.export.mtp) and its proposer (edgekit.speculative.mtp);
# here because this module imports no torch.
MTP_FOLDER = "mtp"  # inside the target's export folder, so builds and bundles that copy the folder carry it
HIDDEN_OUTPUT = "hidden_states"  # the target's final-norm output (also the MTP graph's output)
HIDDEN_INPUT = "target_hidden_states"  # the MTP graph's input of the target's hidden rows


@dataclass
class Proposal:
    """Proposed token ids and, for a sampling proposer, the distribution each was drawn from."""

    tokens: list[int]
    probs: list[np.ndarray] | None = None  # one (vocab,) row per token; None: a point mass (greedy, lookup)


class Proposer(Protocol):
    """Anything that proposes tokens (edgekit.speculative.ngram, draft, mtp)."""

    def propose(self, context: list[int], k: int) -> Proposal: ...

    def observe(self, context: list[int], first_position: int, hidden: np.ndarray | None) -> None: ...
