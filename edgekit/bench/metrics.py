"""The arithmetic of a benchmark: percentiles, spreads, memory peaks, bandwidth and the roofline.

Memory sampling and step timing live in :mod:`edgekit.bench.peer_worker` (which must run without
edgekit) and are re-exported here, so in-process and subprocess contenders measure alike.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Sequence

import numpy as np

from edgekit.bench.peer_worker import MemorySampler, MemoryTracker, StepClock, reset_peak, status_mb
from edgekit.doctor import _cores

__all__ = ["MemorySampler", "MemoryTracker", "StepClock", "measure_bandwidth_gbs", "percentiles",
           "reset_peak", "roofline_fraction", "spread", "status_mb"]

PERCENTILES = (50, 90, 99)


def percentiles(values: Sequence[float], qs: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """``{"p50": ..., "p90": ..., "p99": ...}`` with linear interpolation between ranks
    (NumPy's default, the same as ``statistics.quantiles(method="inclusive")``); None when empty."""
    if not values:
        return {f"p{q}": None for q in qs}
    found = np.percentile(np.asarray(values, dtype=np.float64), qs)
    return {f"p{q}": float(v) for q, v in zip(qs, found)}


def spread(values: Sequence[float]) -> dict[str, float | None]:
    """``{"median", "min", "max"}`` of one number per run; None when there are no runs."""
    if not values:
        return {"median": None, "min": None, "max": None}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def roofline_fraction(weight_bytes: int | None, bandwidth_gbs: float | None, ms_per_token: float | None) -> float | None:
    """How close decoding runs to the memory-bandwidth bound.

    Decoding one token reads every weight once, so it cannot take less than
    ``weight_bytes / bandwidth``; the fraction is that bound over the measured time per token
    (1.0 = at the roofline). None when any input is unknown.
    """
    if not weight_bytes or not bandwidth_gbs or not ms_per_token:
        return None
    return (weight_bytes / (bandwidth_gbs * 1e9)) / (ms_per_token / 1000)


def measure_bandwidth_gbs(threads: int | None = None, mb_per_thread: int = 256, repeats: int = 5) -> float:
    """Memory bandwidth in GB/s as NumPy copies see it: bytes read + written, all threads at once.

    Each thread copies its own buffer, far larger than any cache, ``repeats`` times; the best
    round counts (interference only ever slows a round down). NumPy releases the GIL while it
    copies, so the threads run in parallel.
    """
    threads = threads or _cores()
    count = mb_per_thread * 2**20 // 8
    sources = [np.ones(count) for _ in range(threads)]
    targets = [np.zeros(count) for _ in range(threads)]  # zeros + ones touch every page before timing
    best = float("inf")
    for _ in range(repeats):
        best = min(best, _copy_round(sources, targets))
    return 2 * count * 8 * threads / best / 1e9


def _copy_round(sources: list[np.ndarray], targets: list[np.ndarray]) -> float:
    barrier = threading.Barrier(len(sources) + 1)

    def copy(source: np.ndarray, target: np.ndarray) -> None:
        barrier.wait()
        np.copyto(target, source)

    workers = [threading.Thread(target=copy, args=pair) for pair in zip(sources, targets)]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start

