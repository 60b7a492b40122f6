"""Continuous batching: one thread owns the engine; requests join and leave between steps.

Each step of the scheduler thread:

    1. drop cancelled rows (a client that went away) and finished ones; the last row moves into the hole
    2. admit waiting requests in arrival order while rows are free: prefill each (batch 1, in its row),
       sample its first token
    3. decode every active row together (batch n), sample each row's next token

A serial engine (max_batch 1) runs the same loop, so a model that cannot batch is served one request
at a time from the same FIFO queue. Requests hand results back through ``emit`` (called on this thread;
the web app forwards them to its event loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, sample
from edgekit.serve.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request emits: new text/ids, then one final event with the finish reason (or an error)."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None


class Job:
    """One generation request as the scheduler sees it: prompt, limits, sampling, and its text stream."""

    def __init__(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, eos_ids: tuple[int, ...],
                 stop: list[str], tokenizer: Any, emit: Callable[[Event], None], stream: bool = True):
        self.prompt_ids, self.max_tokens, self.sampling = prompt_ids, max_tokens, sampling
        self.eos_ids, self.stop, self.tokenizer, self.emit = set(eos_ids), stop, tokenizer, emit
        self.stream = stream  # False: one event at the end (less work per token on the event loop)
        self.rng = np.random.default_rng(sampling.seed)
        self.token_ids: list[int] = []
        self.length = 0  # tokens in this row's cache
        self.text = ""  # text of the generated tokens so far
        self._prefix = self._read = 0  # the detokenizer's window (see _detokenize)
        self.sent = ""  # text already emitted (``text`` less a held-back tail)
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def cancel(self) -> None:
        """The client went away: the scheduler frees the row before its next step."""
        self.cancelled.set()

    def accept(self, token: int, metrics: Metrics) -> None:
        """Record a sampled token; emit the text it completes; set ``finish_reason`` when done."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
            metrics.ttft.observe(now - self.submitted)
        else:
            metrics.tpot.observe(now - self.last_token_at)
        self.last_token_at = now
        metrics.generation_tokens.inc()
        self.token_ids.append(token)
        if token in self.eos_ids:
            self.finish_reason = "stop"
        elif len(self.token_ids) >= self.max_tokens:
            self.finish_reason = "length"
        self._emit_text(token)

    def _emit_text(self, token: int) -> None:
        if not self.stream and not self.stop:
            if self.finish_reason is not None:  # one decode of the whole reply, nothing per token
                text = self.tokenizer.decode(self.token_ids) if self.tokenizer is not None else ""
                self.emit(Event(text=text, token_ids=list(self.token_ids), finish_reason=self.finish_reason))
            return
        if self.tokenizer is None:
            self.emit(Event(token_ids=[token], finish_reason=self.finish_reason))
            return
        self._detokenize(final=self.finish_reason is not None)
        text = self.text
        start = max(0, len(self.sent) - max((len(s) for s in self.stop), default=0))
        hits = [i for i in (text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            text, self.finish_reason = text[: min(hits)], "stop"
        elif self.finish_reason is None:
            text = text[: len(text) - _held(text, self.stop)]
        delta = text[len(self.sent):] if text.startswith(self.sent) else ""
        self.sent += delta
        if self.stream:
            self.emit(Event(text=delta, token_ids=[token], finish_reason=self.finish_reason))
        elif self.finish_reason is not None:
            self.emit(Event(text=self.sent, token_ids=list(self.token_ids), finish_reason=self.finish_reason))

    def _detokenize(self, final: bool) -> None:
        """Append the new text to ``self.text``, decoding only a short window of recent tokens.

        ids[prefix:read] were decoded already; their text is the context that makes the next
        token's text (leading spaces, multi-byte characters) come out as in a full decode.
        """
        ids = self.token_ids
        before = self.tokenizer.decode(ids[self._prefix:self._read])
        after = self.tokenizer.decode(ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(ids)


def _failure(what: str, exc: Exception) -> str:
    """Log a failed step, with a traceback only for a bug (not an EdgekitError); -> its requests' error text."""
    if isinstance(exc, EdgekitError):
        log.error("%s: %s", what, exc)
        return str(exc)
    log.exception(what)
    return f"{type(exc).__name__}: {exc}"


def _held(text: str, stops: list[str]) -> int:
    """Characters to hold back: an incomplete UTF-8 character, or a tail that may start a stop string."""
    if text.endswith("\ufffd"):
        return 1
    held = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


class Scheduler:
    """Owns the engine on one thread; ``submit`` queues a job (FIFO), the loop batches them."""

    def __init__(self, engine: Any, metrics: Metrics | None = None):
        self.engine, self.metrics = engine, metrics or Metrics()
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.peak_active = 0  # the largest batch so far (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="edgekit-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def submit(self, job: Job) -> None:
        with self._cond:
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self._cond.notify()

    def wake(self) -> None:
        """Make the loop look at cancellations now (it may be idle-waiting)."""
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.waiting and not self.active:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as exc:  # a failing step fails its rows, never the server
                error = _failure("scheduler step failed", exc)
                for job in list(self.active):
                    job.finish_reason = "error"
                    job.emit(Event(finish_reason="error", error=error))
                self.active.clear()
        for job in [*self.active, *self.waiting]:
            job.emit(Event(finish_reason="error", error="the server is shutting down"))

    def step(self) -> None:
        """Leave, join, decode: one iteration of continuous batching."""
        self._leave()
        self._join()
        self._leave()
        if self.active:
            self._decode()
        self.metrics.active.set(len(self.active))

    def _leave(self) -> None:
        for job in [j for j in self.active if j.finish_reason or j.cancelled.is_set()]:
            row, last = self.active.index(job), len(self.active) - 1
            if row != last:
                self.engine.move(last, row, self.active[last].length)
                self.active[row] = self.active[last]
            self.active.pop()
            if job.finish_reason is None:
                job.finish_reason = "cancelled"
                job.emit(Event(finish_reason="cancelled"))

    def _join(self) -> None:
        while len(self.active) < self.engine.max_batch:
            with self._cond:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
                self.metrics.queue_depth.set(len(self.waiting))
            if job.cancelled.is_set():
                continue
            try:
                logits = self.engine.prefill(len(self.active), job.prompt_ids)
            except Exception as exc:  # this prompt failed; the others go on
                error = _failure("prefill failed", exc)
                job.finish_reason = "error"
                job.emit(Event(finish_reason="error", error=error))
                continue
            self.active.append(job)
            self.peak_active = max(self.peak_active, len(self.active))
            job.length = len(job.prompt_ids)
            self.metrics.prompt_tokens.inc(job.length)
            job.accept(sample(logits, job.sampling, job.rng), self.metrics)

    def _decode(self) -> None:
        rows = self.active
        tokens = [job.token_ids[-1] for job in rows]
        logits = self.engine.decode(tokens, [job.length for job in rows])  # (n, vocab)
        for job, row in zip(rows, logits):
            job.length += 1
            if job.finish_reason is None and not job.cancelled.is_set():
                job.accept(sample(row, job.sampling, job.rng), self.metrics)
