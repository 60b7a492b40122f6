"""Prefill of the prompts that join in one scheduler step: prefix-cache hits restored, misses batched
where that is exact, every prompt's new blocks put in the prefix cache.

    prompts ─lookup─> hits ─order─> rows first..: misses longest first, then hits (a group is a run of rows)
      misses   groups of rows in one forward each; GroupQueryAttention takes batch > 1 only as a first
               prompt (no past), so a row that restored a prefix never joins a group
                 attention only, rotary inside GQA: rows right-padded to the group's longest prompt. Exact:
                   causal attention keeps real positions from seeing later padding, and decode overwrites
                   the padded positions (GQA writes at each row's length from the mask)
                 conv / recurrent states (hybrid families): each row of a group takes the same number of
                   tokens, the shortest prompt's, as no padding token may enter a state
      each row alone (batch 1, from its past) to its end; for a model with states and a prefix cache,
               in chunks ending on block boundaries, where its states are snapshot for the cache
    ─insert─> prefix cache: new blocks' keys/values (read back from the row) and the snapshots

A group grows, longest prompt first, while at least EFFICIENCY of its forward is useful work: real
tokens / (rows x width) when padding, tokens batched / tokens of the group when cutting to the shortest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.serve.prefix_cache import Hit

EFFICIENCY = 0.75  # the useful share a batched prefill forward must keep
MAX_TOKENS = 2048  # rows x width of one batched forward: its logits are (B, S, vocab) float32


@dataclass
class Prefilled:
    """What ``prefill_rows`` did, per prompt in the order given."""

    logits: list[np.ndarray]  # (vocab,) of the last token, or (S, vocab) with keep_all
    rows: list[int]  # the row each prompt went to
    cached: list[int]  # tokens restored from the prefix cache
    batches: list[int]  # rows of each forward run (the prefill batch sizes)


@dataclass
class _Row:
    ids: list[int]
    row: int
    hit: Hit
    keep_all: bool
    pos: int = 0
    parts: list[np.ndarray] = field(default_factory=list)
    snapshots: dict[int, list[np.ndarray]] = field(default_factory=dict)

    def took(self, count: int, logits: np.ndarray, engine: Any) -> None:
        """Record a forward of this row's next ``count`` tokens: its logits, (count, vocab) with keep_all,
        else at least the last token's (the last row); snapshot where due."""
        self.pos += count
        self.parts.append(logits if self.keep_all else logits[-1:])
        cache = engine.prefix_cache
        if cache is not None and engine.stateful and (self.pos % cache.block == 0 or self.pos == len(self.ids)):
            self.snapshots[self.pos] = engine.states(self.row)

    def stop(self, engine: Any) -> int:
        """Where this row's next forward ends: its end, or the next block boundary for snapshots."""
        cache = engine.prefix_cache
        if cache is None or not engine.stateful:
            return len(self.ids)
        return min(len(self.ids), (self.pos // cache.block + 1) * cache.block)

    def logits(self) -> np.ndarray:
        if self.hit.logits is not None and not self.parts:
            return self.hit.logits.copy()
        return np.concatenate(self.parts) if self.keep_all else self.parts[-1][0]


def prefill_rows(engine: Any, first: int, prompts: list[list[int]], keep_all: list[bool]) -> Prefilled:
    """Prefill ``prompts`` into rows first..first+k-1 of a BatchedEngine (module docstring)."""
    cache = engine.prefix_cache
    hits = [Hit() if keep or cache is None else cache.lookup(ids) for ids, keep in zip(prompts, keep_all)]
    order = sorted(range(len(prompts)), key=lambda i: (hits[i].length > 0, -len(prompts[i])))
    rows = {i: _Row(prompts[i], first + r, hits[i], keep_all[i], hits[i].length) for r, i in enumerate(order)}
    for row in rows.values():
        engine.restore(row.row, row.hit)
    batches = []
    for group, widths in _groups(engine, [rows[i] for i in order if rows[i].pos == 0]):
        # Logits from the shortest row's last position on (every row's last token is in there), or all
        # of them when a row needs its prompt's logits; a graph without logits_to_keep returns all anyway.
        keep = 0 if any(r.keep_all for r in group) else max(widths) - min(widths) + 1
        logits = engine.forward(group[0].row, [r.ids[:w] for r, w in zip(group, widths)], [0] * len(group), keep)
        skipped = max(widths) - logits.shape[1]  # positions left out at the front
        for b, (row, width) in enumerate(zip(group, widths)):
            row.took(width, logits[b, :width - skipped], engine)
        batches.append(len(group))
    for i in order:
        row = rows[i]
        while row.pos < len(row.ids):
            stop = row.stop(engine)
            keep = 0 if row.keep_all else 1
            row.took(stop - row.pos, engine.forward(row.row, [row.ids[row.pos:stop]], [row.pos], keep)[0], engine)
            batches.append(1)
    if cache is not None:
        for row in rows.values():
            kv = lambda start, end, r=row.row: engine.keys_values(r, start, end)  # noqa: E731
            cache.insert(row.ids, kv, row.snapshots, None if row.keep_all else row.logits())
            cache.record_hit(row.hit.length)
    k = len(prompts)
    return Prefilled([rows[i].logits() for i in range(k)], [rows[i].row for i in range(k)],
                     [rows[i].hit.length for i in range(k)], batches)


def _groups(engine: Any, misses: list[_Row]) -> list[tuple[list[_Row], list[int]]]:
    """Runs of rows (longest prompt first) worth one batched forward, each with its rows' widths."""
    cache = engine.prefix_cache
    cap = cache.block if cache is not None and engine.stateful else None  # a chunk ends on a block boundary
    lengths = [min(len(r.ids), cap) if cap else len(r.ids) for r in misses]
    groups, i = [], 0
    while i < len(misses):
        j = i + 1
        while j < len(misses) and j - i < engine.prefill_batch and _worth(lengths[i:j + 1], engine.pad_prompts):
            j += 1
        if j - i > 1:
            widths = lengths[i:j] if engine.pad_prompts else [min(lengths[i:j])] * (j - i)
            groups.append((misses[i:j], widths))
        i = j
    return groups


def _worth(lengths: list[int], pad: bool) -> bool:
    """Whether one forward over these prompt lengths (longest first) keeps EFFICIENCY useful work."""
    n, total = len(lengths), sum(lengths)
    if pad:
        area = n * lengths[0]
        return total >= EFFICIENCY * area and area <= MAX_TOKENS
    batched = n * lengths[-1]
    return batched >= EFFICIENCY * total and batched <= MAX_TOKENS
