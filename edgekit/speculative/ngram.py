"""Prompt lookup: propose what followed the latest earlier occurrence of the text's last n tokens.

No model: on code-editing prompts ("rename this variable in this function") the answer repeats
long runs of the prompt, and each run is proposed whole. A match that runs into the end of the
text continues as a copy of itself (LZ77's overlapping copy): text that repeats a short period
(an indentation run, a separator line, a model looping) is proposed k tokens at a time, where a
bounded copy would propose one period.
"""

from __future__ import annotations

import numpy as np

from edgekit.speculative.base import Proposal


class NgramProposer:
    """Match the last ``max_ngram`` .. ``min_ngram`` tokens of the context, longest first."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, overlap: bool = True):
        self.max_ngram, self.min_ngram, self.overlap = max_ngram, min_ngram, overlap

    def propose(self, context: list[int], k: int) -> Proposal:
        """Up to ``k`` tokens that followed the most recent earlier match of the context's tail."""
        if k <= 0:
            return Proposal([])
        ids = np.asarray(context, dtype=np.int64)
        for n in range(min(self.max_ngram, len(ids) - 1), self.min_ngram - 1, -1):
            start = _last_match(ids, n)
            if start is not None:
                follow = [int(t) for t in ids[start + n: start + n + k]]
                period = len(ids) - (start + n)  # the match repeats the text from this far back
                while self.overlap and len(follow) < k:
                    follow.append(follow[len(follow) - period])
                return Proposal(follow)
        return Proposal([])

    def observe(self, context: list[int], first_position: int, rows: np.ndarray | None) -> None:
        """Nothing to keep in step: the context is searched afresh."""


def _last_match(ids: np.ndarray, n: int) -> int | None:
    """Start of the latest window ids[s:s+n] == ids[-n:] with s + n < len(ids) (something follows)."""
    tail = ids[-n:]
    windows = np.lib.stride_tricks.sliding_window_view(ids[:-1], n)  # (len - n, n): each ends before the last token
    hits = np.flatnonzero((windows == tail).all(axis=1))
    return int(hits[-1]) if hits.size else None
