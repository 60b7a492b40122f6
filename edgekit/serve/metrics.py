"""The server's Prometheus metrics, through ``prometheus_client``, one registry per server.

A registry per :class:`Metrics` (not the library's global one), so that several servers or
replicas in one process (tests, a Ray deployment) keep their own counts and never collide on a
name. ``Counter`` / ``Gauge`` / ``Histogram`` keep the small interface the scheduler and the app
use (``inc(amount, **labels)``, ``set``, ``observe``); a metric assigned as an attribute of a
:class:`Metrics` joins its registry::

    metrics.prefix_hits = Counter("edgekit_prefix_cache_hit_tokens_total", "Prompt tokens read from the cache.")
"""

from __future__ import annotations

from typing import Any

import prometheus_client as pc

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
CONTENT_TYPE = pc.CONTENT_TYPE_PLAIN_0_0_4  # the text format Prometheus and every scraper read

# The ``*_created`` timestamp series double the exposition and no dashboard reads them here.
pc.disable_created_metrics()


class _Metric:
    """A prometheus_client metric, unregistered until a :class:`Metrics` takes it."""

    kind = ""

    def __init__(self, name: str, doc: str, labels: tuple[str, ...] = (), **options: Any):
        self.name, self.doc, self.labels = name, doc, tuple(labels)
        self.collector = self._make(name, doc, self.labels, options)

    def _make(self, name: str, doc: str, labels: tuple[str, ...], options: dict) -> Any:
        kinds = {"counter": pc.Counter, "gauge": pc.Gauge, "histogram": pc.Histogram}
        return kinds[self.kind](name, doc, labelnames=labels, registry=None, **options)

    def _child(self, labels: dict[str, str]) -> Any:
        return self.collector.labels(**labels) if self.labels else self.collector


class Counter(_Metric):
    """A monotonically increasing value, optionally split by labels (declared up front)."""

    kind = "counter"

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._child(labels).inc(amount)


class Gauge(_Metric):
    """A value that goes up and down (queue depth, active rows)."""

    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        self._child(labels).set(value)

    def inc(self, amount: float = 1, **labels: str) -> None:
        self._child(labels).inc(amount)


class Histogram(_Metric):
    """Cumulative buckets, sum and count of observations (seconds by default)."""

    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS, labels: tuple[str, ...] = ()):
        super().__init__(name, doc, labels, buckets=buckets)

    def observe(self, value: float, **labels: str) -> None:
        self._child(labels).observe(value)


class Metrics:
    """Everything the server exports on /metrics, in its own registry."""

    def __init__(self):
        self.registry = pc.CollectorRegistry(auto_describe=True)
        self.requests = Counter("edgekit_requests_total", "HTTP requests by endpoint and status code.",
                                labels=("endpoint", "code"))
        self.prompt_tokens = Counter("edgekit_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("edgekit_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("edgekit_time_to_first_token_seconds", "From request queued to its first token.")
        self.tpot = Histogram("edgekit_time_per_output_token_seconds", "Between consecutive tokens of a request.")
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for a batch row.")
        self.active = Gauge("edgekit_active_requests", "Requests holding a batch row.")
        # prefix cache and batched prefill (edgekit.serve.prefix_cache, edgekit.serve.prefill)
        self.prefix_cache_hit_tokens = Counter("edgekit_prefix_cache_hit_tokens_total",
                                               "Prompt tokens restored from the prefix cache, not prefilled.")
        self.prefix_cache_bytes = Gauge("edgekit_prefix_cache_bytes", "Bytes the prefix cache holds.")
        self.prefix_cache_entries = Gauge("edgekit_prefix_cache_entries", "Blocks the prefix cache holds.")
        self.prefix_cache_evictions = Counter("edgekit_prefix_cache_evictions_total",
                                              "Blocks evicted from the prefix cache (LRU, byte budget).")
        # speculative decoding (--speculative: edgekit.serve.speculate)
        self.speculative_proposed = Counter("edgekit_speculative_proposed_tokens_total",
                                            "Proposed tokens the model checked (--speculative).")
        self.speculative_accepted = Counter("edgekit_speculative_accepted_tokens_total",
                                            "Proposed tokens the model kept (--speculative).")
        self.prefill_batch_size = Histogram("edgekit_prefill_batch_size", "Prompts per prefill forward.",
                                            buckets=(1, 2, 4, 8, 16, 32, 64))

    def __setattr__(self, name: str, value: Any) -> None:
        if isinstance(value, _Metric):  # joins this server's registry (a name used twice raises here)
            self.registry.register(value.collector)
        super().__setattr__(name, value)

    def render(self) -> str:
        """The exposition text (format 0.0.4) of this server's metrics."""
        return pc.generate_latest(self.registry).decode()
