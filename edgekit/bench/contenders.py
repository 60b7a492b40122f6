"""What ``edgekit bench`` times: edgekit itself, PyTorch eager, and peers, behind one small contract.

A contender is ``load() -> Loaded``, ``run(prompt_ids, new_tokens) -> RunTiming`` (greedy, exactly
``new_tokens`` tokens, no early stop), ``memory() -> {"peak_rss_mb", "peak_device_mb"}`` and
``close()`` (which may be called twice). In-process contenders wrap a runtime session in edgekit's own generation loop;
peers (optimum, onnxruntime-genai) go through :mod:`edgekit.bench.peer_worker`, in this process
or, with ``NAME=PYTHON``, in a child process of that interpreter.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgekit._files import model_bytes
from edgekit.bench.metrics import MemoryTracker, StepClock
from edgekit.bench.peer_worker import KINDS, Worker
from edgekit.errors import ConfigError, EdgekitError, did_you_mean
from edgekit.types import Engine, ExportedGraph

WORKER = Path(__file__).with_name("peer_worker.py")
GENAI_VARIANTS = ("fp32", "fp16", "bf16", "int8", "int4")  # what its model builder takes


class ContenderFailed(EdgekitError):
    """A contender could not load or run; the bench reports it and goes on."""


@dataclass(frozen=True)
class Loaded:
    """What loading told: how long it took, the model files' bytes, what exactly runs."""

    load_ms: float
    engine_bytes: int | None
    detail: str


@dataclass(frozen=True)
class RunTiming:
    """One generation: time to first token, each later token's latency, end to end (ms)."""

    prompt_tokens: int
    ttft_ms: float
    step_ms: tuple[float, ...]
    e2e_ms: float
    token_ids: tuple[int, ...]
    speculative: dict[str, int] | None = None  # proposed, accepted, steps: a speculative contender's run

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunTiming":
        return cls(int(data["prompt_tokens"]), float(data["ttft_ms"]), tuple(data["step_ms"]),
                   float(data["e2e_ms"]), tuple(data["token_ids"]), data.get("speculative"))

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first per second of decoding; None for a one-token run."""
        total = sum(self.step_ms)
        return len(self.step_ms) / (total / 1000) if total > 0 else None


class Contender(Protocol):
    """The contract every contender keeps."""

    name: str

    def load(self) -> Loaded: ...
    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming: ...
    def memory(self) -> dict[str, float | None]: ...
    def close(self) -> None: ...


class SessionContender:
    """An in-process session (``reset`` / ``forward``) driven by :func:`edgekit.generate.generate`."""

    def __init__(self, name: str, device: bool = False):
        self.name = name
        self.session: Any = None
        self.tracker = MemoryTracker(device=device)

    def _open(self) -> tuple[Any, int | None, str]:
        """(session, engine bytes, detail); subclasses load their runtime here."""
        raise NotImplementedError

    def load(self) -> Loaded:
        start = time.perf_counter()
        with self.tracker.loading():
            self.session, engine_bytes, detail = self._open()
        return Loaded((time.perf_counter() - start) * 1000, engine_bytes, detail)

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming:
        from edgekit.generate import generate

        clock = StepClock()
        with self.tracker.running():
            result = generate(self.session, prompt_ids, new_tokens, on_token=clock.tick)  # no eos: every token
        return RunTiming.from_dict(clock.timing(len(prompt_ids), result.token_ids))

    def memory(self) -> dict[str, float | None]:
        return self.tracker.summary()

    def close(self) -> None:
        close = getattr(self.session, "close", None)  # a TensorRT session frees its device memory
        if close is not None:
            close()
        self.session = None


class EdgekitContender(SessionContender):
    """edgekit's session on an export or build folder, on the engine's own runtime.

    ``wrap(session)`` may return a stand-in with the same ``reset`` / ``forward`` (tests use one
    that sleeps a known time per step).
    """

    def __init__(self, path: str | Path, threads: int | None = None, name: str = "edgekit",
                 wrap: Callable[[Any], Any] | None = None):
        self.path, self.threads, self.wrap = Path(path), threads, wrap
        self.engine = Engine.load(path)
        super().__init__(name, device=_uses_gpu(self.engine))

    def _open(self) -> tuple[Any, int | None, str]:
        from edgekit.runtimes.registry import open_engine

        engine = self.engine
        session = open_engine(engine, threads=self.threads)
        weights = engine.quantized or engine.graph.dtype
        detail = (f"edgekit {engine.graph.target} {weights}{' build' if engine.kind == 'build' else ''}, "
                  f"{session.describe().removesuffix('ExecutionProvider')}")
        return (self.wrap(session) if self.wrap else session), model_bytes(engine.graph.model_path), detail


class SpeculativeContender(EdgekitContender):
    """edgekit's session with a proposer (``edgekit.speculative``): ngram, mtp or draft:PATH, k tokens a step."""

    def __init__(self, path: str | Path, proposer: str, draft_tokens: int | None = None, threads: int | None = None,
                 name: str | None = None):
        super().__init__(path, threads, name=name or f"speculative:{proposer}")
        self.choice, self.draft_tokens, self.proposer = proposer, draft_tokens, None

    def _open(self) -> tuple[Any, int | None, str]:
        from edgekit.speculative import check_draft_tokens, default_draft_tokens, open_proposer

        session, engine_bytes, detail = super()._open()
        check_draft_tokens(self.draft_tokens, True, self.choice)
        self.draft_tokens = self.draft_tokens or default_draft_tokens(self.choice)
        self.proposer = open_proposer(self.choice, session, threads=self.threads)
        return session, engine_bytes, f"{detail}, {self.choice} k={self.draft_tokens}"

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming:
        from edgekit.speculative import generate_speculative

        clock = StepClock()
        with self.tracker.running():
            result = generate_speculative(self.session, prompt_ids, new_tokens, self.proposer, self.draft_tokens,
                                          on_token=clock.tick)
        stats = {"proposed": result.proposed, "accepted": result.accepted, "steps": result.rounds}
        return RunTiming.from_dict({**clock.timing(len(prompt_ids), result.token_ids), "speculative": stats})

    def close(self) -> None:
        close = getattr(self.proposer, "close", None)
        if close is not None:
            close()
        self.proposer = None
        super().close()


def _uses_gpu(engine: Engine) -> bool:
    from edgekit.runtimes.registry import get_runtime

    return get_runtime(engine.runtime).device == "gpu"


class TorchContender(SessionContender):
    """transformers' eager model through :mod:`edgekit.runtimes.torch`, fp32."""

    def __init__(self, source: str, threads: int | None = None, name: str = "torch"):
        self.source, self.threads = source, threads
        super().__init__(name)

    def _open(self) -> tuple[Any, int | None, str]:
        from edgekit.errors import require

        torch = require("torch", "export")
        from edgekit.export.resolve import resolve_model
        from edgekit.runtimes.torch import TorchSession, load_reference

        if self.threads:
            torch.set_num_threads(self.threads)
        session = TorchSession(load_reference(self.source))
        folder = resolve_model(self.source)
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        import transformers

        return session, weights or None, f"transformers {transformers.__version__} eager, torch {torch.__version__}"


class PeerContender:
    """A peer through the worker protocol: in this process, or in ``python``'s child process."""

    def __init__(self, name: str, kind: str, model: str, variant: str | None = None, python: str | None = None,
                 threads: int | None = None, work_dir: str | Path | None = None):
        self.name, self.kind, self.model, self.variant = name, kind, model, variant
        self.python, self.threads, self.work_dir = python, threads, work_dir
        self._worker: Worker | None = None
        self._process: subprocess.Popen | None = None

    def load(self) -> Loaded:
        model = _local_model(self.model)
        work_dir = Path(self.work_dir) if self.work_dir else _default_work_dir()
        work_dir.mkdir(parents=True, exist_ok=True)
        reply = self._call({"op": "load", "kind": self.kind, "model": str(model), "variant": self.variant,
                            "threads": self.threads, "work_dir": str(work_dir)})
        return Loaded(float(reply["load_ms"]), reply.get("engine_bytes"), reply.get("detail", self.kind))

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming:
        return RunTiming.from_dict(self._call({"op": "run", "prompt_ids": prompt_ids, "new_tokens": new_tokens}))

    def memory(self) -> dict[str, float | None]:
        return self._call({"op": "memory"})

    def _call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.python is None:
            self._worker = self._worker or Worker()
            reply = self._worker.handle(json.loads(json.dumps(request)))  # same data as over the pipe
        else:
            reply = self._pipe(request)
        if "error" in reply:
            raise ContenderFailed(reply["error"])
        return reply

    def _pipe(self, request: dict[str, Any]) -> dict[str, Any]:
        if self._process is None:
            self._start()
        self._process.stdin.write(json.dumps(request) + "\n")
        self._process.stdin.flush()
        line = self._process.stdout.readline()
        if not line:
            raise ContenderFailed(f"the worker under {self.python} exited ({self._process.wait()}): {self._stderr_tail()}")
        return json.loads(line)

    def _start(self) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")
        try:
            self._process = subprocess.Popen([self.python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                             stderr=self._stderr, text=True)
        except OSError as exc:
            raise ContenderFailed(f"cannot start {self.python}: {exc.strerror or exc}") from None

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        lines = [line for line in self._stderr.read().splitlines() if line.strip()]
        return lines[-1] if lines else "no output"

    def close(self) -> None:
        self._worker = None
        if self._process is not None:
            try:
                self._process.stdin.close()  # the worker exits at end of input
            except OSError:  # it already died: nothing left to flush
                pass
            try:
                self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
            self._stderr.close()
            self._process = None


def _local_model(source: str) -> Path:
    """The Hugging Face folder an export came from (peers export it their own way)."""
    from edgekit.export.resolve import resolve_model

    try:
        return resolve_model(source).resolve()
    except EdgekitError as exc:
        raise ContenderFailed(f"the export's source model {source!r} is not available: {exc.message}") from None


def _default_work_dir() -> Path:
    from edgekit._files import cache_dir

    return cache_dir() / "bench"


def make_contender(spec: str, graph: ExportedGraph, threads: int | None) -> Contender:
    """A contender from ``NAME[:VARIANT][=PYTHON]``: torch, optimum, genai, genai:int4=/venv/bin/python;
    or ``edgekit:LABEL=FOLDER``, another export or build of edgekit's (e.g. its int4 build)."""
    label, _, python = spec.partition("=")
    kind, _, variant = label.partition(":")
    if kind == "speculative":
        return _speculative(spec, label, variant, python, graph, threads)
    if kind == "edgekit":
        if not (variant and python):
            raise ConfigError(f"--compare {spec!r}: another edgekit folder takes a label and a path",
                              "e.g. --compare edgekit:int4=/path/to/int4-build")
        return EdgekitContender(python, threads, name=label)
    if kind == "llamacpp":  # llama.cpp's own binaries: BIN_DIR, not a python
        from edgekit.bench.llamacpp import make_llamacpp

        return make_llamacpp(spec, label, variant, python, graph, threads)
    if kind not in KINDS:
        raise ConfigError(f"--compare {kind!r} is not a contender.{did_you_mean(kind, [*KINDS, 'llamacpp'])}",
                          f"contenders: {', '.join(KINDS)}, llamacpp; e.g. --compare torch,genai:int4=/path/to/python")
    if variant and (kind != "genai" or variant not in GENAI_VARIANTS):
        raise ConfigError(f"--compare {label!r}: only genai takes a variant ({', '.join(GENAI_VARIANTS)})",
                          "e.g. --compare genai:int4")
    if kind == "torch" and not python:
        return TorchContender(graph.model.source, threads, name=label)
    return PeerContender(label, kind, graph.model.source, variant or None, python or None, threads)


def _speculative(spec: str, label: str, variant: str, path: str, graph: ExportedGraph, threads: int | None):
    """``speculative:ngram``, ``speculative:mtp``, ``speculative:draft=PATH``; ``@K`` sets the draft tokens."""
    choice, _, k = variant.partition("@")
    if choice not in ("ngram", "mtp", "draft") or (choice == "draft") != bool(path) or (k and not k.isdigit()):
        raise ConfigError(f"--compare {spec!r} is not a speculative contender",
                          "e.g. --compare speculative:ngram@4, speculative:mtp or speculative:draft=/path/to/draft-export")
    proposer = f"draft:{path}" if choice == "draft" else choice
    return SpeculativeContender(graph.path, proposer, int(k) if k else None, threads, name=label)
