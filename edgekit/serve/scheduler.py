"""Continuous batching: one thread owns the engine; requests join and leave between steps.

Each step of the scheduler thread:

    1. drop cancelled rows (a client that went away) and finished ones; the last row moves into the hole
    2. admit waiting requests in arrival order while rows are free: prefill them together (restoring
       cached prefixes, batching misses where exact: edgekit.serve.prefill), sample each first token
    3. decode every active row together (batch n), sample each row's next token; with a speculator
       (``serve --speculative``) a row decoding alone verifies proposed tokens instead (edgekit.serve.speculate)

Every request gets a final event: a job whose prefill or sampling fails (a grammar at a dead end)
ends alone with an error, a failing step fails the rows it ran and the jobs it had taken, and
once ``stop`` is called a submitted job is refused with an error.

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
from edgekit.generate import Sampling
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
                 stop: list[str], tokenizer: Any, emit: Callable[[Event], None], stream: bool = True,
                 logprobs: int | None = None, echo: bool = False, processor: Any = None):
        self.prompt_ids, self.max_tokens, self.sampling = prompt_ids, max_tokens, sampling
        # logprobs: top-k per token (None: none); echo: the prompt's too; processor: a logits mask
        # (edgekit.serve.grammar). edgekit.serve.logprobs fills the two lists below.
        self.logprobs, self.echo, self.processor = logprobs, echo, processor
        self.token_logprobs: list[Any] = []  # one entry per generated token, appended before its event
        self.prompt_logprobs: list[Any] | None = None  # with echo: one entry per prompt token, first None
        self.eos_ids, self.stop, self.tokenizer, self._emit = set(eos_ids), stop, tokenizer, emit
        self.answered = False  # its final event (a finish reason) was emitted
        self.stream = stream  # False: one event at the end (less work per token on the event loop)
        self.rng = np.random.default_rng(sampling.seed)
        self.token_ids: list[int] = []
        self.length = 0  # tokens in this row's cache
        self.cached_tokens = 0  # prompt tokens restored from the prefix cache (usage: cached_tokens)
        self.text = ""  # text of the generated tokens so far
        self._prefix = self._read = 0  # the detokenizer's window (see _detokenize)
        self.sent = ""  # text already emitted (``text`` less a held-back tail)
        self.finish_reason: str | None = None
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    def emit(self, event: Event) -> None:
        """Hand ``event`` to the request (the web app's queue)."""
        self.answered = self.answered or event.finish_reason is not None
        self._emit(event)

    def cancel(self) -> None:
        """The client went away: the scheduler frees the row before its next step."""
        self.cancelled.set()

    def prefill(self, engine: Any, row: int) -> np.ndarray:
        """The prompt's forward in ``row``: its last logits (and, with echo, the prompt's logprobs)."""
        from edgekit.serve.logprobs import prefill

        return prefill(self, engine, row)

    def pick(self, logits: np.ndarray, metrics: Metrics) -> None:
        """Mask (processor), sample and record the logprobs of the next token, then accept it."""
        from edgekit.serve.logprobs import pick

        pick(self, logits, metrics)

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


def _fail(job: Job, error: str) -> None:
    """End ``job`` with an error event (once: a job that already ended is left alone)."""
    if job.answered:
        return
    job.finish_reason = "error"
    job.emit(Event(finish_reason="error", error=error))


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

    def __init__(self, engine: Any, metrics: Metrics | None = None, speculator: Any = None):
        self.engine, self.metrics = engine, metrics or Metrics()
        self.speculator = speculator  # edgekit.serve.speculate: a row decoding alone speculates
        if getattr(engine, "prefix_cache", None) is not None:
            engine.prefix_cache.metrics = self.metrics  # hit tokens, bytes, entries, evictions
        self.waiting: deque[Job] = deque()
        self.active: list[Job] = []
        self.peak_active = 0  # the largest batch so far (tests and benchmarks read it)
        self._cond = threading.Condition()
        self._stopping = False
        self._joining: list[Job] = []  # taken from the queue, not yet in a row: a failing step answers them too
        self._thread = threading.Thread(target=self._loop, name="edgekit-scheduler", daemon=True)

    def start(self) -> "Scheduler":
        self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout=10)

    @property
    def stopped(self) -> bool:
        """Whether the loop's thread has ended (``stop`` waits for it a bounded time)."""
        return not self._thread.is_alive()

    def submit(self, job: Job) -> None:
        """Queue ``job``; once the scheduler is stopping it is answered with an error instead."""
        with self._cond:
            if self._stopping:
                _fail(job, "the server is shutting down")
                return
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
                for job in [*self.active, *(j for j in self._joining if j not in self.active)]:
                    _fail(job, error)
                self.active.clear()
            self._joining = []
        with self._cond:  # submit refuses new jobs from here on: none is left unanswered
            left = [*self.active, *self.waiting]
            self.waiting.clear()
        for job in left:
            _fail(job, "the server is shutting down")

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
            if hasattr(self.engine, "remember"):  # the prefix cache keeps prompt + reply for a next turn
                self.engine.remember(row, (job.prompt_ids + job.token_ids)[:job.length])
            if row != last:
                self.engine.move(last, row, self.active[last].length)
                self.active[row] = self.active[last]
            self.active.pop()
            if job.finish_reason is None:
                job.finish_reason = "cancelled"
                job.emit(Event(finish_reason="cancelled"))

    def _join(self) -> None:
        while len(self.active) < self.engine.max_batch:
            free = self.engine.max_batch - len(self.active)
            jobs = self._take(min(free, getattr(self.engine, "prefill_batch", 1)))
            if not jobs:
                return
            self._joining = jobs
            together = [j for j in jobs if not j.echo]  # echo scores its prompt: Job.prefill, alone
            if together:
                self._prefill_together(together)
            for job in jobs:
                if job.echo:
                    self._prefill_one(job)

    def _take(self, n: int) -> list[Job]:
        """Up to ``n`` waiting jobs in arrival order (cancelled ones dropped): they prefill together."""
        jobs: list[Job] = []
        with self._cond:
            while self.waiting and len(jobs) < n:
                job = self.waiting.popleft()
                if not job.cancelled.is_set():
                    jobs.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
        return jobs

    def _prefill_together(self, jobs: list[Job]) -> None:
        """Prefill ``jobs`` into the next rows in one call (the engine restores cached prefixes and
        batches what it can exactly); if that fails, one at a time, so only a failing prompt fails."""
        if len(jobs) == 1 or not hasattr(self.engine, "prefill_rows"):
            for job in jobs:
                self._prefill_one(job)
            return
        try:
            done = self.engine.prefill_rows(len(self.active), [j.prompt_ids for j in jobs])
        except Exception as exc:  # e.g. one bad prompt: the retry below fails that one alone
            log.warning("a batched prefill failed (%s); prefilling its %d prompts one at a time", exc, len(jobs))
            for job in jobs:
                self._prefill_one(job)
            return
        for size in done.batches:
            self.metrics.prefill_batch_size.observe(size)
        for _, job, logits, cached in sorted(zip(done.rows, jobs, done.logits, done.cached), key=lambda t: t[0]):
            self._place(job, logits, cached)  # rows first.. in order: len(active) is each one's row

    def _prefill_one(self, job: Job) -> None:
        before = self._cache_hits()
        try:
            logits = job.prefill(self.engine, len(self.active))
        except Exception as exc:  # this prompt failed; the others go on
            _fail(job, _failure("prefill failed", exc))
            return
        self.metrics.prefill_batch_size.observe(1)
        self._place(job, logits, self._cache_hits() - before)

    def _cache_hits(self) -> int:
        cache = getattr(self.engine, "prefix_cache", None)
        return cache.hit_tokens if cache is not None else 0

    def _place(self, job: Job, logits: np.ndarray, cached: int) -> None:
        """A prefilled job takes the next row and samples its first token."""
        self.active.append(job)
        self.peak_active = max(self.peak_active, len(self.active))
        job.length, job.cached_tokens = len(job.prompt_ids), cached
        self.metrics.prompt_tokens.inc(job.length)
        self._pick(job, logits)

    def _decode(self) -> None:
        rows = self.active
        if self.speculator is not None:
            if len(rows) == 1 and self.speculator.round(rows[0], self.engine, self.metrics):
                return
            self.speculator.settle(rows, self.engine)
        tokens = [job.token_ids[-1] for job in rows]
        logits = self.engine.decode(tokens, [job.length for job in rows])  # (n, vocab)
        for job, row in zip(rows, logits):
            job.length += 1
            if job.finish_reason is None and not job.cancelled.is_set():
                self._pick(job, row)

    def _pick(self, job: Job, logits: np.ndarray) -> None:
        """``job.pick``; if it fails (a grammar that allows nothing, a bad row of logits) only this job
        ends, with an error; its row is freed by the next ``_leave``."""
        try:
            job.pick(logits, self.metrics)
        except Exception as exc:
            _fail(job, _failure("sampling a token failed", exc))
