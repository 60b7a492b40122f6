"""Engines the scheduler steps: a batched one for ``ort`` exports on CPU, a serial one for the rest.

Both expose the same small contract over *rows* 0..n-1 (n active sequences, always a prefix):

    prefill(row, ids) -> logits (vocab,)    the row's first forward; row == number active before it
    decode(tokens, lengths) -> (n, vocab)   one token per row; lengths[b] = tokens row b holds before it
    move(src, dst, length)                  copy a row's cache (compaction after a row leaves)

Batched cache (``ort`` target, every layer attention, CPU):

    kv[i]: (max_batch, KV, max_context, D) per key/value tensor, one row per active sequence

    prefill  batch 1: past = present = kv[i][row:row+1]   (a contiguous view: GQA writes the row in place)
    decode   batch n: past = present = kv[i][:n]          input_ids (n, 1), attention_mask (n, T) right-padded,
                                                          row b has lengths[b] + 1 ones, T = max of those
    leave    row r leaves: the last row's first `length` positions are copied into r, so rows stay a prefix

GroupQueryAttention reads each row's length from the mask (seqlens_k = ones - 1), so rows of different
lengths decode together and never see each other's padding.

Linear-attention layers (fixed-size conv and recurrent states) get two (max_batch, *state) buffers,
``past`` and ``spare``: a decode step reads past[:n] and writes spare[:n], then the two swap (rows
beyond n hold nothing); a prefill zeroes past[row], writes spare[row] and copies it back. Decode
feeds exactly one token per row, so no padding token ever enters a recurrent state.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgekit.runtimes.onnxruntime import OrtSession
from edgekit.types import ExportedGraph, state_io


def batching_unsupported(session: Any) -> str | None:
    """Why this session cannot batch (None when it can)."""
    graph = session.graph
    if not isinstance(session, OrtSession):
        return f"{session.describe()} is served one request at a time"
    if not session.shared:
        return f"the {graph.target!r} target concatenates its KV cache (batching needs the ort target's shared buffer)"
    if session.device != "cpu":
        return "batched slots are host buffers; the CUDA provider is served one request at a time"
    return None


class BatchedEngine:
    """Rows of one shared (max_batch, KV, max_context, D) buffer per cache tensor, stepped together."""

    def __init__(self, session: OrtSession, max_batch: int, max_context: int):
        self.session, self.graph = session, session.graph
        self.max_batch, self.max_context = max_batch, max_context
        self._io = state_io(self.graph.layers)
        # per cache tensor in graph order: (max_batch, KV, max_context, D) for key/value, shared past/present;
        # (max_batch, *state) for a fixed-size state, with a spare buffer for its next value
        self.past = [self._zeros(io) for io in self._io]
        self.spare = [None if io.layer.has_kv else self._zeros(io) for io in self._io]
        self.cache_bytes = sum(b.nbytes for b in [*self.past, *self.spare] if b is not None)

    def _zeros(self, io) -> np.ndarray:
        layer = io.layer
        if layer.has_kv:
            return np.zeros((self.max_batch, layer.num_kv_heads, self.max_context, layer.head_dim), self.session.dtype)
        dtype = np.float32 if io.part == "recurrent" else self.session.dtype
        return np.zeros((self.max_batch, *layer.states[io.part]), dtype)

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: slice) -> np.ndarray:
        ort = self.session.ort
        binding = self.session.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        binding.bind_output("logits", "cpu")
        for io, past, spare in zip(self._io, self.past, self.spare):
            value = ort.OrtValue.ortvalue_from_numpy(past[rows])  # a view: no copy, GQA writes in place
            binding.bind_ortvalue_input(io.past, value)
            target = value if spare is None else ort.OrtValue.ortvalue_from_numpy(spare[rows])
            binding.bind_ortvalue_output(io.present, target)
        self.session.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()  # (B, S, vocab)

    def prefill(self, row: int, ids: list[int]) -> np.ndarray:
        tokens = np.asarray(ids, dtype=np.int64).reshape(1, -1)  # (1, S)
        mask = np.ones_like(tokens)
        for past in self._states(self.past):
            past[row] = 0  # a new sequence starts from empty states
        logits = self._run(tokens, mask, slice(row, row + 1))[0, -1]
        for past, spare in zip(self.past, self.spare):
            if spare is not None:
                past[row] = spare[row]
        return logits

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        n = len(tokens)
        totals = np.asarray(lengths, dtype=np.int64) + 1  # (n,)
        mask = (np.arange(totals.max())[None, :] < totals[:, None]).astype(np.int64)  # (n, T) right padding
        ids = np.asarray(tokens, dtype=np.int64).reshape(n, 1)  # (n, 1)
        logits = self._run(ids, mask, slice(0, n))[:, 0]
        for i, spare in enumerate(self.spare):
            if spare is not None:  # the next states are in spare[:n]; rows >= n hold nothing
                self.past[i], self.spare[i] = spare, self.past[i]
        return logits

    def move(self, src: int, dst: int, length: int) -> None:
        for io, past in zip(self._io, self.past):
            if io.layer.has_kv:
                past[dst, :, :length] = past[src, :, :length]
            else:
                past[dst] = past[src]

    def _states(self, buffers: list) -> list[np.ndarray]:
        return [b for io, b in zip(self._io, buffers) if not io.layer.has_kv]


class SerialEngine:
    """One sequence at a time on any session (any runtime, target and layer kind)."""

    max_batch = 1
    cache_bytes = 0  # the session grows its own cache per request

    def __init__(self, session: Any, max_context: int):
        self.session, self.graph, self.max_context = session, session.graph, max_context

    def prefill(self, row: int, ids: list[int]) -> np.ndarray:
        self.session.reset(self.max_context)
        return self.session.last_logits(ids)

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        return self.session.last_logits(tokens)[None]  # (1, vocab)

    def move(self, src: int, dst: int, length: int) -> None:  # never called with one row
        raise AssertionError("a serial engine has one row")


def serving_engine(graph: ExportedGraph, max_batch: int, max_context: int, threads: int | None = None) -> Any:
    """The batched engine when the graph allows it and ``max_batch`` > 1, else the serial one.

    Returns the engine and, for a serial one, why it is not batched (None otherwise).
    """
    from edgekit.runtimes.registry import open_engine

    session = open_engine(graph.path, threads=threads)
    # A TensorRT plan holds the profile's context, which may be less than the model's.
    max_context = min(max_context, getattr(session, "max_context", max_context))
    reason = batching_unsupported(session) if max_batch > 1 else None
    if max_batch > 1 and reason is None:
        return BatchedEngine(session, max_batch, max_context), None
    return SerialEngine(session, max_context), reason
