"""ONNX Runtime backend: open an export folder and step it with its KV cache.

For the ``ort`` target the cache is one preallocated (1, KV, max_len, D) buffer per
layer, bound as both past and present through IO binding: GroupQueryAttention
writes the new rows in place, so a decode step copies no cache. The ``portable``
target's graph concatenates; its presents are fed back as OrtValues (no NumPy copy).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ArtifactError, RuntimeUnavailableError, require
from edgekit.types import ExportedGraph

NUMPY_DTYPES = {"fp32": np.float32, "fp16": np.float16}


def is_available() -> str | None:
    """None when onnxruntime imports, else the reason."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); pip install 'edgekit-llm[cpu]'"
    return None


def open_session(path: str | Path, threads: int | None = None, providers: list[str] | None = None) -> "OrtSession":
    """Open an export folder on ONNX Runtime (CPU unless ``providers`` says otherwise)."""
    return OrtSession(ExportedGraph.load(path), threads=threads, providers=providers)


class OrtSession:
    """One sequence (batch 1) running on an exported graph, with its cache."""

    def __init__(self, graph: ExportedGraph, threads: int | None = None, providers: list[str] | None = None):
        ort = require("onnxruntime", "cpu")
        if graph.dtype not in NUMPY_DTYPES:
            raise RuntimeUnavailableError(
                f"{graph.path}: ONNX Runtime's CPU kernels do not run {graph.dtype} exports",
                "export with --dtype fp32 (or fp16) for CPU",
            )
        self.graph = graph
        self.ort = ort
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(graph.model_path), options, providers=providers or ["CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/etc.
            raise ArtifactError(
                f"ONNX Runtime cannot load {graph.model_path}: {str(exc).splitlines()[0][:300]}",
                "re-export with `edgekit export ... --force`, or check the onnxruntime version",
            ) from None
        self.dtype = NUMPY_DTYPES[graph.dtype]
        self.shared = bool(graph.kv_cache.get("shared_buffer"))
        self.providers = self.session.get_providers()
        self.reset()

    @property
    def length(self) -> int:
        """Tokens held in the cache."""
        return self._length

    def reset(self, capacity: int = 0) -> None:
        """Empty the cache; for a shared buffer, preallocate ``capacity`` positions."""
        self._length = 0
        self._capacity = 0
        self._past: list[Any] = []
        self._arrays: list[np.ndarray] = []
        if self.shared:
            self._allocate(max(capacity, 64))
        else:
            self._past = self._wrap([self._zeros(layer, 0) for layer in self.graph.layers for _ in range(2)])

    def _zeros(self, layer, length: int) -> np.ndarray:
        return np.zeros((1, layer.num_kv_heads, length, layer.head_dim), dtype=self.dtype)

    def _wrap(self, arrays: list[np.ndarray]) -> list[Any]:
        # OrtValues over NumPy memory (no copy); the arrays are kept alive alongside.
        self._arrays = arrays
        return [self.ort.OrtValue.ortvalue_from_numpy(a) for a in arrays]

    def _allocate(self, capacity: int) -> None:
        """(Re)allocate shared buffers, keeping what is cached."""
        capacity = min(capacity, self.graph.model.max_position_embeddings)
        arrays = [self._zeros(layer, capacity) for layer in self.graph.layers for _ in range(2)]
        for new, old in zip(arrays, self._arrays):
            new[:, :, : self._length] = old[:, :, : self._length]
        self._past = self._wrap(arrays)
        self._capacity = capacity

    def forward(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Append ``token_ids`` to the sequence; returns their logits, (S, vocab) float32."""
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
        binding.bind_output("logits", "cpu")  # first, so get_outputs()[0] is the logits
        names = self._cache_names()
        for (past_name, present_name), value in zip(names, self._past):
            binding.bind_ortvalue_input(past_name, value)
            if self.shared:
                binding.bind_ortvalue_output(present_name, value)
            else:
                binding.bind_output(present_name, "cpu")
        self.session.run_with_iobinding(binding)
        outputs = binding.get_outputs()
        if not self.shared:
            self._past = list(outputs[1:])
        self._length = total
        return outputs[0].numpy()[0]

    def _cache_names(self) -> list[tuple[str, str]]:
        return [
            (f"past_key_values.{layer.index}.{kv}", f"present.{layer.index}.{kv}")
            for layer in self.graph.layers
            for kv in ("key", "value")
        ]
