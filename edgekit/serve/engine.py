"""Engines the scheduler steps: a batched one for ``ort`` exports on CPU, a serial one for the rest.

Both expose the same small contract over *rows* 0..n-1 (n active sequences, always a prefix):

    prefill(row, ids, keep_all=False) -> logits (vocab,), or (S, vocab) for every prompt position
    prefill_rows(first, prompts, keep_all) -> Prefilled   prompts joining together, into rows first..
    decode(tokens, lengths) -> (n, vocab)   one token per row; lengths[b] = tokens row b holds before it
    move(src, dst, length)                  copy a row's cache (compaction after a row leaves)
    verify(row, ids, start, keep) -> (keep, vocab)   ids after the start tokens row holds, that row alone
    rollback(row, length) -> held           after a verify: keep `length` tokens; -> what the row holds
    verify_room(start) -> n or None         tokens a verify from `start` may feed (None: any)
                                            (speculative decoding: edgekit.serve.speculate)
    mtp_logits -> (n, vocab) or None        row 0's MTP head rows of its last forward, the last at the
                                            last position it fed (an export with --mtp)

Batched cache (``ort`` target, every layer attention, CPU):

    kv[i]: (max_batch, KV, max_context, D) per key/value tensor, one row per active sequence

    prefill  rows r..r+k: past = present = kv[i][r:r+k]   (a contiguous view: GQA writes the rows in place);
             several rows only as a first prompt (no past: GQA's rule), a row with a cached prefix alone
    decode   batch n: past = present = kv[i][:n]          input_ids (n, 1), attention_mask (n, T) right-padded,
                                                          row b has lengths[b] + 1 ones, T = max of those
    leave    row r leaves: the last row's first `length` positions are copied into r, so rows stay a prefix

GroupQueryAttention reads each row's length from the mask (seqlens_k = ones - 1), so rows of different
lengths decode together and never see each other's padding.

Linear-attention layers (fixed-size conv and recurrent states) get two (max_batch, *state) buffers,
``past`` and ``spare``: a decode step reads past[:n] and writes spare[:n], then the two swap (rows
beyond n hold nothing); a prefill zeroes past[row], writes spare[row] and copies it back. Decode
feeds exactly one token per row, so no padding token ever enters a recurrent state. Which prompts
share a prefill forward, and the prefix cache, are in ``edgekit.serve.prefill``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from edgekit.errors import InternalError
from edgekit.runtimes.onnxruntime import KEEP_INPUT, OrtSession
from edgekit.serve.prefix_cache import DEFAULT_BLOCK, Hit, PrefixCache
from edgekit.types import MTP_LOGITS, ExportedGraph, state_io

if TYPE_CHECKING:
    from edgekit.serve.prefill import Prefilled


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
    """Rows of one shared (max_batch, KV, max_context, D) buffer per cache tensor, stepped together.

    ``prefix_cache_bytes`` > 0 keeps computed prompt prefixes (edgekit.serve.prefix_cache) in that
    many bytes; ``prefill_batch`` caps the prompts prefilled in one forward (default: max_batch).
    """

    def __init__(self, session: OrtSession, max_batch: int, max_context: int, prefix_cache_bytes: int = 0,
                 prefix_block: int = DEFAULT_BLOCK, prefill_batch: int | None = None):
        self.session, self.graph = session, session.graph
        self.max_batch, self.max_context = max_batch, max_context
        # Builds take `logits_to_keep`: the LM head then reads only the positions a prefill needs
        # (a 512-token prompt of a 150k vocabulary otherwise computes 512 rows of logits for one).
        self.keeps_logits = KEEP_INPUT in {i.name for i in session.session.get_inputs()}
        self._io = state_io(self.graph.layers)
        # per cache tensor in graph order: (max_batch, KV, max_context, D) for key/value, shared past/present;
        # (max_batch, *state) for a fixed-size state, with a spare buffer for its next value
        self.past = [self._zeros(io) for io in self._io]
        self.spare = [None if io.layer.has_kv else self._zeros(io) for io in self._io]
        self.cache_bytes = sum(b.nbytes for b in [*self.past, *self.spare] if b is not None)
        self.stateful = any(not io.layer.has_kv for io in self._io)  # conv / recurrent states (hybrid)
        self.prefill_batch = max(1, prefill_batch or max_batch)
        # Right padding is exact only where nothing mixes positions but masked attention with its
        # rotary inside GQA (GQA's prompt positions are 0..S-1; edgekit's own rotary reads them from the mask).
        self.pad_prompts = not self.stateful and rotary_in_kernel(self.graph)
        self.prefix_cache = (PrefixCache(prefix_cache_bytes, prefix_block, anywhere=not self.stateful)
                             if prefix_cache_bytes > 0 else None)
        # per row: states snapshot at block ends while decoding, for `remember` (models with states)
        self._snaps = [{} for _ in range(max_batch)] if self.prefix_cache and self.stateful else None
        self._verified: tuple = (None, 0, 0, None)  # (row, start, end, states) of the last verify
        # An export with --mtp: per row, the head's rows of its last forward (the last at its last position).
        self._takes_mtp = MTP_LOGITS in {o.name for o in session.session.get_outputs()}
        self._heads: list[np.ndarray | None] = [None] * max_batch

    def _zeros(self, io) -> np.ndarray:
        layer = io.layer
        if layer.has_kv:
            return np.zeros((self.max_batch, layer.num_kv_heads, self.max_context, layer.head_dim), self.session.dtype)
        dtype = np.float32 if io.part == "recurrent" else self.session.dtype
        return np.zeros((self.max_batch, *layer.states[io.part]), dtype)

    def _run(self, ids: np.ndarray, mask: np.ndarray, rows: slice, keep: int = 0) -> tuple[np.ndarray, Any]:
        """One forward over ``rows``; logits (B, S, vocab), or of the last ``keep`` positions (B, keep, vocab)
        on a build that takes ``logits_to_keep`` (0: every position); and the MTP head's rows alike, or None."""
        ort = self.session.ort
        binding = self.session.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask)
        if self.keeps_logits:
            binding.bind_cpu_input(KEEP_INPUT, np.asarray([keep], dtype=np.int64))
        binding.bind_output("logits", "cpu")
        for io, past, spare in zip(self._io, self.past, self.spare):
            value = ort.OrtValue.ortvalue_from_numpy(past[rows])  # a view: no copy, GQA writes in place
            binding.bind_ortvalue_input(io.past, value)
            target = value if spare is None else ort.OrtValue.ortvalue_from_numpy(spare[rows])
            binding.bind_ortvalue_output(io.present, target)
        if self._takes_mtp:
            binding.bind_output(MTP_LOGITS, "cpu")  # last: its output index follows the states'
        self.session.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        return outputs[0].numpy(), outputs[-1].numpy() if self._takes_mtp else None  # (B, S, vocab) each

    @property
    def mtp_logits(self) -> np.ndarray | None:
        """Row 0's MTP head rows from its last forward (a verify's ``keep``, else one), or None."""
        return self._heads[0]

    def _keep_heads(self, heads: Any, first: int, lengths: list[int], width: int, rows: int = 1) -> None:
        """Per row of a forward: its last ``rows`` head rows at real positions (a verify's ``keep``; one
        otherwise: a 150k-vocabulary row is 600 KB). ``heads``: the forward's, (B, S or keep, vocab)."""
        if heads is None:
            return
        skipped = width - heads.shape[1]  # positions the graph computed no rows for
        for b, length in enumerate(lengths):
            valid = heads[b, :length - skipped]  # right padding left out
            self._heads[first + b] = valid[-rows:].copy()

    def prefill(self, row: int, ids: list[int], keep_all: bool = False) -> np.ndarray:
        """One prompt into ``row``: the last token's logits (vocab,), or every position's (S, vocab)
        with ``keep_all`` (prompt logprobs: such a prompt skips the prefix cache)."""
        return self.prefill_rows(row, [ids], [keep_all]).logits[0]

    def prefill_rows(self, first: int, prompts: list[list[int]], keep_all: list[bool] | None = None) -> "Prefilled":
        """Prompts into rows first.., batched where exact (module ``prefill``); see :class:`Prefilled`."""
        from edgekit.serve.prefill import prefill_rows

        return prefill_rows(self, first, prompts, keep_all or [False] * len(prompts))

    def forward(self, first: int, seqs: list[list[int]], starts: list[int], keep: int = 0,
                head_rows: int = 1) -> np.ndarray:
        """Append seqs[b] to row first + b, which holds starts[b] tokens; -> (B, S, vocab), S = the longest.

        Shorter rows are right-padded (the caller knows when that is exact). GroupQueryAttention takes
        several rows only as a first prompt (every start 0); a row with a past runs alone. ``keep`` > 0:
        logits of the last ``keep`` positions only, where the graph can (``keeps_logits``), (B, keep, vocab).
        An MTP head's last ``head_rows`` rows per row are kept for ``mtp_logits``.
        """
        width = max(len(s) for s in seqs)
        ids = np.zeros((len(seqs), width), dtype=np.int64)  # (B, S) right padding
        for b, seq in enumerate(seqs):
            ids[b, :len(seq)] = seq
        totals = np.asarray(starts, dtype=np.int64) + [len(s) for s in seqs]  # (B,)
        mask = (np.arange(totals.max())[None, :] < totals[:, None]).astype(np.int64)  # (B, T)
        rows = slice(first, first + len(seqs))
        logits, heads = self._run(ids, mask, rows, keep)
        self._keep_heads(heads, first, [len(s) for s in seqs], width, head_rows)
        for past, spare in zip(self.past, self.spare):
            if spare is not None:
                past[rows] = spare[rows]
        return logits

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        n = len(tokens)
        totals = np.asarray(lengths, dtype=np.int64) + 1  # (n,)
        mask = (np.arange(totals.max())[None, :] < totals[:, None]).astype(np.int64)  # (n, T) right padding
        ids = np.asarray(tokens, dtype=np.int64).reshape(n, 1)  # (n, 1)
        logits, heads = self._run(ids, mask, slice(0, n), keep=1)
        logits = logits[:, 0]
        self._keep_heads(heads, 0, [1] * n, 1)
        for i, spare in enumerate(self.spare):
            if spare is not None:  # the next states are in spare[:n]; rows >= n hold nothing
                self.past[i], self.spare[i] = spare, self.past[i]
        if self._snaps is not None:
            for b, total in enumerate(totals.tolist()):
                if total % self.prefix_cache.block == 0:
                    self._snaps[b][total] = self.states(b)
        return logits

    def verify(self, row: int, ids: list[int], start: int, keep: int) -> np.ndarray:
        """Feed ``ids`` to ``row`` (which holds ``start`` tokens) alone: the last ``keep`` positions'
        logits (keep, vocab). A model with fixed-size states keeps the row's states first: they
        cannot drop positions, so a rollback returns to them."""
        self._verified = (row, start, start + len(ids), self.states(row) if self.stateful else None)
        return self.forward(row, [ids], [start], keep, head_rows=keep)[0, -keep:]  # its head rows: the speculator's

    def verify_room(self, start: int) -> int | None:
        """Tokens a verify from ``start`` may feed: up to the next block end, where a model with states
        is snapshot for the prefix cache (as decode snapshots it); None: any number."""
        if self._snaps is None:
            return None
        block = self.prefix_cache.block
        return (start // block + 1) * block - start

    def rollback(self, row: int, length: int) -> int:
        """Keep ``length`` tokens of the last verify's row; -> the tokens it holds. Attention rows
        hold every position written, so any length is kept (what follows is overwritten later);
        states hold only the end: all kept, or back to the states before the verify."""
        verified_row, start, end, states = self._verified
        if verified_row != row or not start <= length <= end:
            raise InternalError(f"rollback of row {row} to {length} after a verify of row {verified_row}, {start}..{end}")
        if states is None or length == end:
            if states is not None and self._snaps is not None and end % self.prefix_cache.block == 0:
                self._snaps[row][end] = self.states(row)  # as decode does at a block end
            return length
        buffers = [past for io, past in zip(self._io, self.past) if not io.layer.has_kv]
        for buffer, saved in zip(buffers, states):
            buffer[row] = saved
        return start

    def move(self, src: int, dst: int, length: int) -> None:
        for io, past in zip(self._io, self.past):
            if io.layer.has_kv:
                past[dst, :, :length] = past[src, :, :length]
            else:
                past[dst] = past[src]
        if self._snaps is not None:
            self._snaps[dst] = self._snaps[src]
        self._heads[dst] = self._heads[src]

    def states(self, row: int) -> list[np.ndarray]:
        """Copies of a row's fixed-size states (a prefix-cache snapshot); [] for attention-only models."""
        return [past[row].copy() for io, past in zip(self._io, self.past) if not io.layer.has_kv]

    def keys_values(self, row: int, start: int, end: int) -> list[np.ndarray]:
        """Copies of a row's positions start..end-1, per attention tensor (KV, end - start, D)."""
        return [past[row, :, start:end].copy() for io, past in zip(self._io, self.past) if io.layer.has_kv]

    def restore(self, row: int, hit: Hit) -> None:
        """Start ``row`` from a prefix-cache hit: its keys/values and states (empty states on a miss)."""
        kv = [past for io, past in zip(self._io, self.past) if io.layer.has_kv]
        for entry in hit.entries:
            n = min(entry.end, hit.length) - entry.start
            for buffer, cached in zip(kv, entry.kv):
                buffer[row, :, entry.start:entry.start + n] = cached[:, :n]
        states = [past for io, past in zip(self._io, self.past) if not io.layer.has_kv]
        for i, buffer in enumerate(states):
            buffer[row] = hit.entries[-1].states[i] if hit.length else 0
        if self._snaps is not None:
            self._snaps[row] = {}
        self._heads[row] = None  # no forward of this sequence yet

    def remember(self, row: int, ids: list[int]) -> None:
        """Put a leaving row's sequence in the prefix cache: ``ids``, the prompt and the generated tokens
        its cache holds, so that a growing chat's next prompt resumes after this reply."""
        if self.prefix_cache is None or not ids:
            return
        snapshots = {} if self._snaps is None else {**self._snaps[row], len(ids): self.states(row)}
        self.prefix_cache.insert(ids, lambda start, end: self.keys_values(row, start, end), snapshots, None)


class SerialEngine:
    """One sequence at a time on any session (any runtime, target and layer kind); no prefix cache
    (its session grows and owns one sequence's cache) and nothing to batch."""

    max_batch = 1
    cache_bytes = 0  # the session grows its own cache per request
    prefix_cache = None

    def __init__(self, session: Any, max_context: int):
        self.session, self.graph, self.max_context = session, session.graph, max_context

    @property
    def mtp_logits(self) -> np.ndarray | None:
        """The last forward's MTP head rows (S, vocab) on a graph that runs the head (export --mtp), else None."""
        return getattr(self.session, "mtp_logits", None)

    def prefill(self, row: int, ids: list[int], keep_all: bool = False) -> np.ndarray:
        """The prompt's last logits (vocab,), or with ``keep_all`` every position's (S, vocab)."""
        self.session.reset(self.max_context)
        return self.session.forward(ids) if keep_all else self.session.last_logits(ids)

    def prefill_rows(self, first: int, prompts: list[list[int]], keep_all: list[bool] | None = None) -> "Prefilled":
        """The batched engine's contract with one row: prompts has one prompt."""
        from edgekit.serve.prefill import Prefilled

        assert len(prompts) == 1, "a serial engine has one row"
        keep = bool(keep_all and keep_all[0])
        return Prefilled([self.prefill(first, prompts[0], keep)], [first], [0], [1])

    def decode(self, tokens: list[int], lengths: list[int]) -> np.ndarray:
        return self.session.last_logits(tokens)[None]  # (1, vocab)

    def verify(self, row: int, ids: list[int], start: int, keep: int) -> np.ndarray:
        """Feed ``ids`` after a checkpoint (the session holds ``start`` tokens): the last ``keep`` rows."""
        self.session.checkpoint()
        return self.session.forward(ids)[-keep:]

    def verify_room(self, start: int) -> None:
        """No bound on a verify: the session keeps no prefix-cache snapshots."""
        return None

    def rollback(self, row: int, length: int) -> int:
        """Back to ``length`` tokens, or as near as the session can (its checkpoint): -> what it holds."""
        return self.session.rollback(length)

    def move(self, src: int, dst: int, length: int) -> None:  # never called with one row
        raise AssertionError("a serial engine has one row")


def rotary_in_kernel(graph: ExportedGraph) -> bool:
    """Whether every GroupQueryAttention node of the graph rotates q and k itself (``do_rotary`` 1).

    Then a right-padded prompt row is exact: GQA gives a first prompt the positions 0..S-1 whatever
    its length, where the rotary edgekit emits for other head sizes reads positions from the mask
    (total - S + i: negative on a padded row). Reads the graph's structure alone, not its weights.
    """
    try:
        import onnx
    except ImportError:  # the cpu extra brings onnx; without it, do not pad
        return False
    model = onnx.load(str(graph.model_path), load_external_data=False)
    nodes = [n for n in model.graph.node if n.op_type == "GroupQueryAttention"]
    return bool(nodes) and all(any(a.name == "do_rotary" and a.i == 1 for a in n.attribute) for n in nodes)


def serving_engine(graph: ExportedGraph, max_batch: int, max_context: int, threads: int | None = None,
                   prefix_cache_bytes: int = 0, prefill_batch: int | None = None) -> Any:
    """The batched engine when the graph allows it and ``max_batch`` > 1, else the serial one.

    Returns the engine and, for a serial one, why it is not batched (None otherwise).
    """
    from edgekit.runtimes.registry import open_engine

    session = open_engine(graph.path, threads=threads)
    # A TensorRT plan holds the profile's context, which may be less than the model's.
    max_context = min(max_context, getattr(session, "max_context", max_context))
    reason = batching_unsupported(session) if max_batch > 1 else None
    if max_batch > 1 and reason is None:
        engine = BatchedEngine(session, max_batch, max_context, prefix_cache_bytes, prefill_batch=prefill_batch)
        return engine, None
    return SerialEngine(session, max_context), reason
