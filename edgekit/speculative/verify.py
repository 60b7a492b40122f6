"""Which proposed tokens the target keeps: the longest agreeing prefix, then one token of its own.

``rows`` are the target's logits for the last committed token and each proposed token,
(k + 1, vocab): row i predicts the token after proposal i (row 0: after the committed text).

Greedy: keep proposal i + 1 while it is the argmax of row i, then append the argmax of the first
row that disagrees (or of the last row): the output is exactly plain greedy decoding's.

Sampling (Leviathan et al. 2023, Chen et al. 2023): keep proposal d with probability
min(1, p(d) / q(d)), p the target's distribution, q the proposer's; on the first rejection draw
from max(0, p - q) renormalized; after k acceptances draw the bonus token from the last row.
Every emitted token is then distributed exactly as the target would sample it. A proposer
without a distribution (prompt lookup) is a point mass: q(d) = 1.
"""

from __future__ import annotations

import numpy as np

from edgekit.generate import Sampling, distribution


def accept_greedy(rows: np.ndarray, proposed: list[int]) -> tuple[int, int]:
    """(how many proposals are kept, the target's next token after them)."""
    choices = np.argmax(rows, axis=-1)  # (k + 1,)
    kept = 0
    while kept < len(proposed) and proposed[kept] == int(choices[kept]):
        kept += 1
    return kept, int(choices[kept])


def accept_sampled(rows: np.ndarray, proposed: list[int], draft_probs: list[np.ndarray] | None,
                   sampling: Sampling, rng: np.random.Generator) -> tuple[int, int]:
    """The rejection rule: (proposals kept, the next token), distributed as the target samples."""
    for i, token in enumerate(proposed):
        p = distribution(rows[i], sampling)
        q = None if draft_probs is None else draft_probs[i]
        q_token = 1.0 if q is None else float(q[token])
        if q_token > 0 and rng.random() < min(1.0, p[token] / q_token):
            continue
        return i, _residual_draw(p, q, token, rng)
    p = distribution(rows[len(proposed)], sampling)
    return len(proposed), int(rng.choice(p.size, p=p))


def _residual_draw(p: np.ndarray, q: np.ndarray | None, token: int, rng: np.random.Generator) -> int:
    """Draw from max(0, p - q), renormalized (for a point mass q: p without ``token``)."""
    if q is None:
        residual = p.copy()
        residual[token] = 0.0
    else:
        residual = np.maximum(p - q, 0.0)
    total = residual.sum()
    if total <= 0:  # p == q (up to rounding): the rejection had probability ~0; p itself is exact
        residual, total = p, p.sum()
    return int(rng.choice(residual.size, p=residual / total))
