"""ONNX Runtime backend: open an export folder and step it with its KV cache.

For the ``ort`` target the cache is one preallocated (1, KV, max_len, D) buffer per
layer, bound as both past and present through IO binding: GroupQueryAttention
writes the new rows in place, so a decode step copies no cache. The ``portable``
target's graph concatenates; its presents are fed back as OrtValues (no NumPy copy).
Fixed-size states of linear-attention layers (conv, fp32 recurrent) ping-pong between two
preallocated buffers per state: no allocation and no copy per step either.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ArtifactError, EdgekitError, InternalError, RuntimeUnavailableError, require
from edgekit.types import MTP_LOGITS, ExportedGraph, StateIO, state_io

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}
KEEP_INPUT = "logits_to_keep"  # builds: how many last positions get logits, 0 = all


def weights_fit(model: Path, available: int | None = None) -> bool:
    """Whether ``model``'s weights fit in 80 % of the memory available now (``MemAvailable``)."""
    from edgekit._files import model_bytes

    if available is None:
        try:
            meminfo = Path("/proc/meminfo").read_text()
            available = next(int(line.split()[1]) * 1024 for line in meminfo.splitlines()
                             if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):
            return True  # not Linux: ONNX Runtime's defaults
    return model_bytes(model) <= 0.8 * available


class OrtSession:
    """One sequence (batch 1) running on an exported graph, with its cache."""

    def __init__(self, graph: ExportedGraph, threads: int | None = None, memory_map: bool | None = None,
                 settings: dict[str, Any] | None = None, profile_prefix: str | None = None):
        ort = require("onnxruntime", "cpu")
        if graph.dtype not in NUMPY_DTYPES:
            raise RuntimeUnavailableError(
                f"{graph.path}: ONNX Runtime's CPU kernels do not run {graph.dtype} exports",
                "export with --dtype fp32 (or fp16) for CPU",
            )
        self.graph = graph
        self.ort = ort
        settings = settings or {"providers": ["CPUExecutionProvider"], "provider_options": [{}], "intra_op_threads": 0}
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads or settings["intra_op_threads"] or 0
        # Fatal only: an error ORT logs is also raised, and reaches the user once, as OrtRunError.
        options.log_severity_level = 4
        # Idle pool threads sleep instead of spinning: on a few shared cores a spinning thread
        # takes the core the other one needs (decode 1.4x faster at load 4; benchmarks/NOTES.md).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if profile_prefix:  # edgekit.bench.profile_step: ORT's own per-node timings
            options.enable_profiling = True
            options.profile_file_prefix = profile_prefix
        on_cpu = settings["providers"][0] == "CPUExecutionProvider"
        self.memory_mapped = on_cpu and (not weights_fit(graph.model_path) if memory_map is None else memory_map)
        if self.memory_mapped:
            # ORT maps page-aligned external data, then prepacks each MatMul weight into a private
            # copy: memory the size of the weights. Without prepacking the weights stay file pages
            # the kernel can evict and re-read, so a model larger than RAM runs (int4 MatMulNBits
            # then dequantizes per call: many times slower, measured in benchmarks/README.md).
            options.add_session_config_entry("session.disable_prepacking", "1")
        from edgekit.runtimes.onnxruntime_build import check_provider

        try:
            self.session = check_provider(ort, graph.model_path, settings, options)
        except RuntimeUnavailableError:
            raise
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/etc.
            raise ArtifactError(
                f"ONNX Runtime cannot load {graph.model_path}: {str(exc).splitlines()[0][:300]}",
                "re-export with `edgekit export ... --force`, or check the onnxruntime version",
            ) from None
        self.device = "cpu" if settings["providers"][0] == "CPUExecutionProvider" else "cuda"
        self.dtype = NUMPY_DTYPES[graph.dtype]
        self.shared = bool(graph.kv_cache.get("shared_buffer"))
        self.providers = self.session.get_providers()
        # Builds may take how many positions the LM head computes (edgekit.engines.graph_edits).
        self._takes_keep = KEEP_INPUT in {i.name for i in self.session.get_inputs()}
        defaults = {KEEP_INPUT: np.zeros(1, dtype=np.int64)} if self._takes_keep else None
        self.session = GuardedSession(self.session, graph, defaults)
        self._last_only = np.ones(1, dtype=np.int64)
        # An export for MTP (edgekit.export.mtp) also outputs its head's logits: the proposer reads them.
        self._takes_mtp = MTP_LOGITS in {o.name for o in self.session.get_outputs()}
        self.mtp_logits: np.ndarray | None = None  # (S, vocab) of the last forward, on such a graph
        self.reset()

    def describe(self) -> str:
        """What runs this session: "onnxruntime 1.32.0 CPUExecutionProvider"."""
        return f"onnxruntime {self.ort.__version__} {self.providers[0]}"

    def close(self) -> None:
        """Drop the cache buffers now (the InferenceSession goes with the object)."""
        self._past, self._spare, self._keep = [], [], {}

    @property
    def length(self) -> int:
        """Tokens held in the cache."""
        return self._length

    def reset(self, capacity: int = 0) -> None:
        """Empty the caches; for a shared KV buffer, preallocate ``capacity`` positions."""
        self._length = 0
        self._capacity = 0
        self._steps = 0  # forward calls since the reset: a rollback undoes at most one
        self._mark: tuple[int, int, list[Any]] = (0, 0, [])
        self._io = state_io(self.graph.layers)
        # past[i] feeds input i; spare[i] receives a fixed-size state's next value (ping-pong, no allocation).
        self._past: list[Any] = [None] * len(self._io)
        self._spare: list[Any] = [None] * len(self._io)
        self._keep: dict[tuple[str, int], np.ndarray] = {}
        for i, io in enumerate(self._io):
            if not io.layer.has_kv:
                self._past[i] = self._value(self._zeros(io, 0), ("past", i))
                self._spare[i] = self._value(self._zeros(io, 0), ("spare", i))
            elif not self.shared:
                self._past[i] = self._value(self._zeros(io, 0), ("past", i))
        if self.shared:
            self._allocate(max(capacity, 64))

    def _zeros(self, io: StateIO, length: int) -> np.ndarray:
        layer = io.layer
        if not layer.has_kv:
            dtype = np.float32 if io.part == "recurrent" else self.dtype
            return np.zeros((1, *layer.states[io.part]), dtype=dtype)
        return np.zeros((1, layer.num_kv_heads, length, layer.head_dim), dtype=self.dtype)

    def _value(self, array: np.ndarray, slot: tuple[str, int]) -> Any:
        if self.device == "cpu":
            # An OrtValue over NumPy memory (no copy); the array is kept alive alongside.
            self._keep[slot] = array
            return self.ort.OrtValue.ortvalue_from_numpy(array)
        return self.ort.OrtValue.ortvalue_from_numpy(array, "cuda", 0)

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate the shared KV buffers, keeping what is cached."""
        capacity = min(capacity, self.graph.model.max_position_embeddings)
        for i, io in enumerate(self._io):
            if io.layer.has_kv:
                array = self._zeros(io, capacity)
                if self._past[i] is not None:  # growth is rare: a host copy is fine
                    array[:, :, : self._length] = self._past[i].numpy()[:, :, : self._length]
                self._past[i] = self._value(array, ("past", i))
        self._capacity = capacity

    def forward(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Append ``token_ids`` to the sequence; returns their logits, (S, vocab) float32."""
        return self._run(token_ids, last_only=False)

    def last_logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Append ``token_ids``; returns the last one's logits, (vocab,) float32.

        On a build with ``logits_to_keep`` the LM head computes that row alone (prefill saves
        S - 1 rows of a hidden x vocab product).
        """
        return self._run(token_ids, last_only=True)[-1]

    @property
    def rollback_in_place(self) -> bool:
        """Whether :meth:`rollback` drops KV rows by length, over any number of forward calls."""
        return self.shared and all(io.layer.has_kv for io in self._io)

    def checkpoint(self) -> None:
        """Mark this point; a later :meth:`rollback` returns to it (or past it, for KV rows in place).

        No copy: a concatenated cache keeps the previous OrtValues (each step makes new ones), and a
        fixed-size state's previous value is its ping-pong spare until a second step overwrites it.
        """
        self._mark = (self._length, self._steps, list(self._past))

    def rollback(self, length: int) -> int:
        """Drop the tokens after ``length``; returns the length now held (see edgekit.runtimes.base).

        On the ``ort`` target's shared buffer, KV rows drop by length alone: GroupQueryAttention reads
        the valid length from the mask, and the rows past it are rewritten by the next step. A graph
        with fixed-size states (or a concatenated cache) returns to the checkpoint instead.
        """
        marked, steps, pasts = self._mark
        if not marked <= length <= self._length:
            raise InternalError(f"rollback to {length} outside the checkpoint's {marked}..{self._length} tokens")
        if length == self._length:
            return length
        if self.rollback_in_place:
            self._length = length
            return length
        if self._steps - steps != 1:
            raise InternalError(f"rollback over {self._steps - steps} forward calls; sessions keep one")
        for i, io in enumerate(self._io):
            if not io.layer.has_kv:
                self._past[i], self._spare[i] = self._spare[i], self._past[i]
            elif not self.shared:
                self._past[i] = pasts[i]
        self._length, self._steps = marked, steps
        return marked

    def _run(self, token_ids: list[int] | np.ndarray, last_only: bool) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, -1)
        total = self._length + ids.shape[1]
        if total > self.graph.model.max_position_embeddings:
            raise ArtifactError(
                f"sequence of {total} tokens exceeds the model's {self.graph.model.max_position_embeddings} positions",
                "use a shorter prompt or fewer new tokens",
            )
        if self.shared and total > self._capacity:
            self._allocate(max(total, 2 * self._capacity))
        binding = self.session.io_binding()
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if last_only and self._takes_keep:
            binding.bind_cpu_input(KEEP_INPUT, self._last_only)
        binding.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits
        for i, io in enumerate(self._io):
            binding.bind_ortvalue_input(io.past, self._past[i])
            if not io.layer.has_kv:
                binding.bind_ortvalue_output(io.present, self._spare[i])
            elif self.shared:
                binding.bind_ortvalue_output(io.present, self._past[i])  # GQA writes in place
            else:
                binding.bind_output(io.present, self.device)
        if self._takes_mtp:
            binding.bind_output(MTP_LOGITS, "cpu")  # last: the states keep their output indices
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if self._takes_mtp:
            self.mtp_logits = outputs[-1].numpy()[0]
        for i, io in enumerate(self._io):
            if not io.layer.has_kv:
                self._past[i], self._spare[i] = self._spare[i], self._past[i]
            elif not self.shared:
                self._past[i] = outputs[1 + i]
        self._length = total
        self._steps += 1
        return outputs[0].numpy()[0]


class OrtRunError(EdgekitError):
    """ONNX Runtime failed inside a forward pass (a kernel rejected the graph or its inputs)."""


class GuardedSession:
    """An InferenceSession whose runs raise :class:`OrtRunError` instead of ORT's own exceptions,
    and whose IO bindings start with ``defaults`` bound (a later bind replaces them).

    Every caller (run, validate, bench, serve's engines) steps the model through this one object,
    so a kernel failure reaches the user as ``error:`` / ``hint:`` wherever it happens. A build's
    ``logits_to_keep`` is a required input (IO binding cannot bind a defaulted one); code that binds
    the export's inputs only (validate, serving) thus keeps every position.
    """

    def __init__(self, session: Any, graph: ExportedGraph, defaults: dict[str, np.ndarray] | None = None):
        self._session, self._graph, self._defaults = session, graph, defaults or {}

    def io_binding(self) -> Any:
        binding = self._session.io_binding()
        for name, value in self._defaults.items():
            binding.bind_cpu_input(name, value)
        return binding

    def run(self, output_names, feed: dict, *args, **kwargs):
        try:
            return self._session.run(output_names, {**self._defaults, **feed}, *args, **kwargs)
        except Exception as exc:  # ORT raises RuntimeError, Fail, InvalidArgument, ...
            raise self._failure(exc) from exc

    def run_with_iobinding(self, binding: Any, *args, **kwargs) -> None:
        try:
            self._session.run_with_iobinding(binding, *args, **kwargs)
        except Exception as exc:
            raise self._failure(exc) from exc

    def _failure(self, exc: Exception) -> OrtRunError:
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        detail = lines[0].removeprefix("Error in execution: ")[:400]
        graph = self._graph
        other = "portable" if graph.target == "ort" else "ort"
        return OrtRunError(
            f"ONNX Runtime failed running {graph.path}: {detail}",
            f"re-export with another target: edgekit export {graph.model.source} -o NEW_DIR --target {other}; "
            f"if that runs, report this failure with {graph.path / 'edgekit.json'}",
        )

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)
