"""Prefix cache: a prompt that starts with tokens already computed (the same system prompt, a growing
chat) restores their cache instead of prefilling them again.

Prompts are cut into blocks of ``block`` tokens; an entry holds one block's part of the model's cache,
keyed by a hash of its tokens and of its parent's key, so a key names the whole prefix up to it:

    key_0 = H(ROOT, ids[0:block])   key_i = H(key_{i-1}, ids[i*block:(i+1)*block])   (vLLM's block hash)

    entry   tokens   its n <= block tokens; n < block for a prompt's last, partial block (a "tail")
            kv       per attention cache tensor, (KV, n, D): those positions' keys or values
            states   per fixed-size state tensor (hybrid families): its value after the entry's last token
            logits   (vocab,) of the last token, kept where a prompt ended (a repeated prompt runs no forward)

Attention keys and values are per position, so an attention-only model resumes at any length inside a
match; a model with conv / recurrent states resumes only where a snapshot was taken (an entry's end),
which is why the engine prefills such models in chunks that end on block boundaries.

Memory-bounded LRU: ``budget`` bytes of arrays. A lookup or insert touches its chain leaf first, so an
ancestor is always more recent than its descendants and eviction takes leaves first; an entry evicted
takes its descendants with it (they could no longer be reached).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ROOT = b"edgekit-prefix-root"
DEFAULT_BLOCK = 64


@dataclass
class Entry:
    """One block (or a prompt's tail) of a cached prefix."""

    key: bytes
    parent: bytes
    start: int  # position of its first token
    tokens: tuple[int, ...]
    kv: list[np.ndarray]  # per attention tensor (KV, n, D)
    states: list[np.ndarray]  # per fixed-size state tensor, after the last token
    logits: np.ndarray | None = None  # (vocab,) where a prompt ended
    children: set[bytes] = field(default_factory=set)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.logits is None else self.logits.nbytes
        return sum(a.nbytes for a in [*self.kv, *self.states]) + extra


@dataclass
class Hit:
    """What a lookup found: restore ``length`` tokens from ``entries`` (a chain from the first block)."""

    length: int = 0
    entries: list[Entry] = field(default_factory=list)
    logits: np.ndarray | None = None  # set when length == the whole prompt (no forward needed)


def block_key(parent: bytes, tokens: list[int] | tuple[int, ...]) -> bytes:
    """The key of a block whose prefix is ``parent``'s."""
    data = np.asarray(tokens, dtype=np.int64).tobytes()
    return hashlib.blake2b(parent + data, digest_size=16).digest()


class PrefixCache:
    """LRU of prefix blocks within ``budget`` bytes; ``anywhere``: a hit may end inside an entry
    (attention-only models), else only at an entry's end (models with fixed-size states)."""

    def __init__(self, budget: int, block: int = DEFAULT_BLOCK, anywhere: bool = True, metrics: Any = None):
        self.budget, self.block, self.anywhere, self.metrics = budget, block, anywhere, metrics
        self.entries: OrderedDict[bytes, Entry] = OrderedDict()
        self.roots: set[bytes] = set()  # the children of ROOT
        self.nbytes = 0
        self.evictions = 0
        self.hit_tokens = 0  # restored so far
        self._reported_evictions = 0

    def lookup(self, ids: list[int]) -> Hit:
        """The longest cached prefix of ``ids`` this model can resume from."""
        chain, parent, pos = [], ROOT, 0
        while pos + self.block <= len(ids):
            entry = self.entries.get(block_key(parent, ids[pos:pos + self.block]))
            if entry is None:
                break
            chain.append(entry)
            parent, pos = entry.key, entry.end
        length = pos
        best, common = self._partial(parent, ids[pos:])
        if best is not None:
            chain.append(best)
            length = pos + common
        return self._resumable(chain, length, len(ids))

    def _partial(self, parent: bytes, rest: list[int]) -> tuple[Entry | None, int]:
        """The child of ``parent`` sharing the most leading tokens with ``rest``; without ``anywhere``
        only a child whose tokens all match counts (a snapshot exists at its end alone)."""
        best, common = None, 0
        for key in self.roots if parent == ROOT else self.entries[parent].children:
            entry = self.entries[key]
            n = _common(entry.tokens, rest)
            if n > common and (self.anywhere or n == len(entry.tokens)):
                best, common = entry, n
        return best, common

    def _resumable(self, chain: list[Entry], length: int, total: int) -> Hit:
        """Trim a match to where a forward can start: it must leave one token to run unless the
        prompt's own logits are cached, and (without ``anywhere``) end at an entry's end."""
        if length == total and chain and chain[-1].end == total and chain[-1].logits is not None:
            self._touch(chain)
            return Hit(length, chain, chain[-1].logits)
        if length >= total:
            length = total - 1
        if not self.anywhere:
            while chain and chain[-1].end > length:
                chain.pop()
            length = chain[-1].end if chain else 0
        while chain and chain[-1].start >= length:
            chain.pop()
        if length <= 0 or not chain:
            return Hit()
        self._touch(chain)
        return Hit(length, chain)

    def insert(self, ids: list[int], kv: Any, snapshots: dict[int, list[np.ndarray]],
               logits: np.ndarray | None) -> None:
        """Cache the prefix blocks of a prefilled prompt that are not cached yet.

        kv(start, end) -> per attention tensor its (KV, end - start, D) copy; snapshots[p]: the
        fixed-size states after p tokens (at least at every block end and the prompt's end, for a
        model with such states); logits: the last token's, kept with the entry that ends the prompt.
        """
        chain, parent = [], ROOT
        for start in range(0, len(ids), self.block):
            tokens = tuple(ids[start:start + self.block])
            key = block_key(parent, tokens)
            entry = self.entries.get(key)
            if entry is None:
                states = snapshots.get(start + len(tokens), [])
                if not self.anywhere and not states:
                    break  # no snapshot here: nothing further can be resumed from
                entry = Entry(key, parent, start, tokens, kv(start, start + len(tokens)), states)
                if not self._add(entry):
                    break
            chain.append(entry)
            parent = key
        if chain and chain[-1].end == len(ids) and chain[-1].logits is None and logits is not None:
            chain[-1].logits = logits.copy()
            self.nbytes += logits.nbytes
        self._touch(chain)
        self._shrink()
        self._report()

    def _add(self, entry: Entry) -> bool:
        if entry.nbytes > self.budget:
            return False
        self.entries[entry.key] = entry
        (self.roots if entry.parent == ROOT else self.entries[entry.parent].children).add(entry.key)
        self.nbytes += entry.nbytes
        return True

    def _touch(self, chain: list[Entry]) -> None:
        for entry in reversed(chain):  # the leaf first: ancestors end up more recent
            self.entries.move_to_end(entry.key)

    def _shrink(self) -> None:
        while self.nbytes > self.budget and self.entries:
            self._evict(next(iter(self.entries)))

    def _evict(self, key: bytes) -> None:
        entry = self.entries.pop(key)
        self.nbytes -= entry.nbytes
        self.evictions += 1
        if entry.parent == ROOT:
            self.roots.discard(key)
        elif entry.parent in self.entries:
            self.entries[entry.parent].children.discard(key)
        for child in list(entry.children):
            if child in self.entries:
                self._evict(child)

    def record_hit(self, tokens: int) -> None:
        """Count restored tokens (the engine calls this once per prompt), in the metrics too."""
        self.hit_tokens += tokens
        if self.metrics is not None and tokens:
            self.metrics.prefix_cache_hit_tokens.inc(tokens)

    def _report(self) -> None:
        if self.metrics is None:
            return
        self.metrics.prefix_cache_bytes.set(self.nbytes)
        self.metrics.prefix_cache_entries.set(len(self.entries))
        new = self.evictions - self._reported_evictions
        if new:
            self.metrics.prefix_cache_evictions.inc(new)
        self._reported_evictions = self.evictions


def _common(a: tuple[int, ...], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
