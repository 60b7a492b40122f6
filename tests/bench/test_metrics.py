"""The arithmetic of the bench on known data: percentiles, spreads, the roofline, memory peaks."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import pytest

from edgekit.bench import metrics, peer_worker
from edgekit.bench.metrics import MemorySampler, MemoryTracker, percentiles, roofline_fraction, spread

MB = 2**20


def test_percentiles_interpolate_between_ranks():
    values = list(range(1, 101))  # 1..100, shuffled so order cannot matter
    np.random.default_rng(0).shuffle(values)
    assert percentiles(values) == pytest.approx({"p50": 50.5, "p90": 90.1, "p99": 99.01})
    inclusive = statistics.quantiles(values, n=100, method="inclusive")
    assert percentiles(values, (10, 75)) == pytest.approx({"p10": inclusive[9], "p75": inclusive[74]})
    assert percentiles([7.0]) == {"p50": 7.0, "p90": 7.0, "p99": 7.0}
    assert percentiles([]) == {"p50": None, "p90": None, "p99": None}


def test_spread_is_median_min_max():
    assert spread([3.0, 1.0, 10.0, 2.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert spread([]) == {"median": None, "min": None, "max": None}


def test_roofline_fraction():
    # 1 GB of weights at 10 GB/s cannot decode faster than 100 ms a token; 200 ms measured is half.
    assert roofline_fraction(10**9, 10.0, 200.0) == pytest.approx(0.5)
    assert roofline_fraction(10**9, 10.0, 100.0) == pytest.approx(1.0)
    assert roofline_fraction(None, 10.0, 100.0) is None and roofline_fraction(10**9, None, 100.0) is None


def _allocate(mb: int, hold_s: float = 0.1) -> None:
    block = np.ones(mb * MB // 8)  # ones, not empty: pages count only once written
    time.sleep(hold_s)
    del block


@pytest.mark.parametrize("kernel_peak", [True, False], ids=["VmHWM", "sampling-thread"])
def test_sampler_sees_a_200_mb_allocation(monkeypatch, kernel_peak):
    if not kernel_peak:  # as on kernels that refuse clear_refs: only the thread can see the peak
        monkeypatch.setattr(peer_worker, "reset_peak", lambda: False)
    elif not peer_worker.reset_peak():
        pytest.skip("this kernel does not let a process reset its VmHWM")
    with MemorySampler() as sampler:
        _allocate(200)
    assert 190 <= sampler.growth_mb <= 260, sampler.growth_mb
    assert sampler.end_mb - sampler.base_mb < 50  # freed again


def test_tracker_adds_the_loaded_footprint_to_the_worst_run():
    tracker = MemoryTracker()
    with tracker.loading():
        weights = np.ones(100 * MB // 8)
    with tracker.running():
        _allocate(50, 0.05)
    with tracker.running():
        _allocate(20, 0.05)
    peak = tracker.summary()["peak_rss_mb"]
    del weights
    assert 140 <= peak <= 190, peak
    assert tracker.summary()["peak_device_mb"] is None


def test_bandwidth_is_a_positive_rate():
    probe = metrics.measure_bandwidth(threads=2, mb_per_thread=16, repeats=2)
    for key in ("read_gbs", "copy_gbs"):
        assert math.isfinite(probe[key]) and probe[key] > 0
    assert probe["threads"] == 2 and probe["mb_per_thread"] == 16 and "2 threads" in probe["method"]


def test_device_memory_is_sampled_when_tracked(monkeypatch):
    # No GPU here: a stand-in NVML reading that rises by 300 MB while the block runs.
    readings = iter([1000.0] + [1300.0] * 10_000)
    monkeypatch.setattr(peer_worker, "gpu_process_mb", lambda: next(readings))
    tracker = MemoryTracker(device=True)
    with tracker.loading():
        time.sleep(0.05)
    assert tracker.summary()["peak_device_mb"] == pytest.approx(300.0)
