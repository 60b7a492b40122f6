"""The runtime contract: what every runtime module under ``edgekit/runtimes/`` provides.

A runtime is one module that sets ``RUNTIME`` to an object with this shape; the registry
(``edgekit.runtimes.registry``) finds it by name. Vendor SDKs are imported inside methods, so
importing a runtime module costs nothing and works on any machine.

    Runtime.names          ("ort-cpu",)              names a profile or --runtime may use
    Runtime.is_available() -> reason | None         can it run here at all (SDK installed, ...)
    Runtime.check(graph, profile, precision) -> [EdgekitError]  refusals, each a message and a hint
    Runtime.plan(graph, profile, precision, options) -> dict its settings, plain data (--dry-run)
    Runtime.requirements(profile) -> dict                    what a device needs beyond the profile's hardware
    Runtime.environment_problems(machine) -> [str]           what this machine lacks to build
    Runtime.build(graph, plan, out) -> dict                  writes the engine files, returns facts
    Runtime.open(engine, threads=None, memory_map=None) -> Session
    Runtime.kv_copies, .strips_weights, .weight_quantization, .edits_graph   what the plan needs to know

A ``Session`` is one sequence on an engine with its cache. generate, validate, quality, bench
and serve use nothing else:

    session.graph                 the ExportedGraph contract (layers, model spec, I/O)
    session.length                tokens held in the cache
    session.reset(capacity=0)     empty the cache (optionally preallocating positions)
    session.forward(ids)          append ids, return their logits (S, vocab) float32
    session.last_logits(ids)      append ids, return the last position's logits (vocab,)
    session.describe()            what runs it, for people: "onnxruntime 1.32.0 CPUExecutionProvider"
    session.close()               free what it holds (device memory); optional
    session.checkpoint()          mark this point of the sequence (no copy)
    session.rollback(length)      drop the tokens after ``length`` (at least the checkpoint's length, at
                                  most one forward call after it); returns the length the cache now holds:
                                  ``length`` where rows drop in place (a KV-only shared buffer), else the
                                  checkpoint's, and the caller feeds the tokens in between again.
    session.rollback_in_place     True where rollback drops rows by length (over any number of calls)

Rollback serves speculative decoding (``edgekit.speculative``): a verify step appends k + 1 tokens and
keeps a prefix. Sessions keep exactly one step of history for free (the ping-pong spare of each fixed
state, the previous OrtValues of a concatenated cache), which is all a verify step needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class Session(Protocol):
    """One sequence (batch 1) on an engine, with its KV cache and recurrent states."""

    graph: Any  # edgekit.types.ExportedGraph

    @property
    def length(self) -> int: ...

    def reset(self, capacity: int = 0) -> None: ...

    def forward(self, token_ids: list[int] | np.ndarray) -> np.ndarray: ...

    def last_logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray: ...

    def describe(self) -> str: ...

    def close(self) -> None: ...

    @property
    def rollback_in_place(self) -> bool: ...

    def checkpoint(self) -> None: ...

    def rollback(self, length: int) -> int: ...


class Runtime(Protocol):
    """One way to run an engine; see the module docstring."""

    names: tuple[str, ...]
    device: str  # "cpu" | "gpu": which profiles it serves
    extra: str  # the pip extra that brings its SDK: edgekit-llm[extra]
    family: str  # an alias for the first runtime of this family a profile lists ("ort")
    kv_copies: int  # KV buffers per cache tensor (2 when it ping-pongs)
    strips_weights: bool  # builds plans without weights, refitted at load
    weight_quantization: tuple[str, ...]  # --quant values it builds
    edits_graph: bool  # the build edits the saved graph (last-position logits, one tied LM head)

    def is_available(self) -> str | None: ...

    def check(self, graph: Any, profile: Any, precision: str) -> list[Any]: ...  # EdgekitError each

    def plan(self, graph: Any, profile: Any, precision: str, options: dict[str, Any] | None = None) -> dict[str, Any]: ...

    def requirements(self, profile: Any) -> dict[str, Any]: ...

    def environment_problems(self, machine: Any) -> list[str]: ...

    def build(self, graph: Any, plan: Any, out: Path) -> dict[str, Any]: ...

    def open(self, engine: Any, threads: int | None = None, memory_map: bool | None = None) -> Session: ...
