"""Prometheus text exposition (format 0.0.4) without a client library: counters, gauges, histograms."""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Counter:
    """A monotonically increasing value, optionally split by one label set per child."""

    kind = "counter"

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0) + amount

    def samples(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items()) or [((), 0)]
        return [f"{self.name}{_labels(key)} {_num(value)}" for key, value in items]


class Gauge(Counter):
    """A value that goes up and down (queue depth, active rows)."""

    kind = "gauge"

    def set(self, value: float) -> None:
        with self._lock:
            self._values[()] = value


class Histogram:
    """Cumulative buckets, sum and count of observations in seconds."""

    kind = "histogram"

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.name, self.doc, self.buckets = name, doc, buckets
        self._counts = [0] * (len(buckets) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def samples(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = [], 0
        for bound, count in zip([*map(_num, self.buckets), "+Inf"], counts):
            running += count
            lines.append(f'{self.name}_bucket{{le="{bound}"}} {running}')
        return [*lines, f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]


class Metrics:
    """Everything the server exports on /metrics."""

    def __init__(self):
        self.requests = Counter("edgekit_requests_total", "HTTP requests by endpoint and status code.")
        self.prompt_tokens = Counter("edgekit_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("edgekit_generation_tokens_total", "Tokens generated.")
        self.ttft = Histogram("edgekit_time_to_first_token_seconds", "From request queued to its first token.")
        self.tpot = Histogram("edgekit_time_per_output_token_seconds", "Between consecutive tokens of a request.")
        self.queue_depth = Gauge("edgekit_queue_depth", "Requests waiting for a batch row.")
        self.active = Gauge("edgekit_active_requests", "Requests holding a batch row.")

    def render(self) -> str:
        out = []
        for metric in (self.requests, self.prompt_tokens, self.generation_tokens, self.ttft, self.tpot,
                       self.queue_depth, self.active):
            out += [f"# HELP {metric.name} {metric.doc}", f"# TYPE {metric.name} {metric.kind}", *metric.samples()]
        return "\n".join(out) + "\n"


def _labels(key: tuple[tuple[str, str], ...]) -> str:
    if not key:
        return ""
    return "{" + ",".join(f'{k}="{v}"' for k, v in key) + "}"


def _num(value: float) -> str:
    return repr(float(value)) if value != int(value) else str(int(value))
