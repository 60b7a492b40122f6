"""The arithmetic of a benchmark: percentiles, spreads, memory peaks, bandwidth and the roofline.

Memory sampling and step timing live in :mod:`edgekit.bench.peer_worker` (which must run without
edgekit) and are re-exported here, so in-process and subprocess contenders measure alike.

The roofline is ``bytes a decode step reads / bandwidth``: :func:`decode_bytes` counts the first
from the ONNX graph, :func:`machine_bandwidth` measures the second on this machine (cached).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bench.peer_worker import MemorySampler, MemoryTracker, StepClock, reset_peak, status_mb
from edgekit.doctor import _cores, _cpu

__all__ = ["MemorySampler", "MemoryTracker", "StepClock", "decode_bytes", "load_average", "machine_bandwidth",
           "measure_bandwidth", "percentiles", "reset_peak", "roofline_fraction", "spread",
           "status_mb"]

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


def roofline_fraction(read_bytes: int | None, bandwidth_gbs: float | None, ms_per_token: float | None) -> float | None:
    """How close decoding runs to the memory-bandwidth bound.

    Decoding one token reads ``read_bytes`` (:func:`decode_bytes`: every weight once, one row of an
    embedding table), so it cannot take less than ``read_bytes / bandwidth``; the fraction is that
    bound over the measured time per token (1.0 = at the roofline). None when any input is unknown.
    """
    if not read_bytes or not bandwidth_gbs or not ms_per_token:
        return None
    return (read_bytes / (bandwidth_gbs * 1e9)) / (ms_per_token / 1000)


# ---- bytes a decode step reads -------------------------------------------------------------------

# Ops that read one row of an initializer per token id, by input index (data, scales, zero points).
ROW_GATHERS = {"Gather": (0,), "GatherBlockQuantized": (0, 2, 3)}
HALF_BYTE_TYPES = {21, 22, 23}  # UINT4, INT4, FLOAT4E2M1: two values a byte


def decode_bytes(model_path: str | Path) -> int | None:
    """Bytes of weights one decode step (one token) reads from ``model_path``'s ONNX graph.

    Every initializer a node consumes is read whole, except one that only Gather-like ops consume
    on token ids (an untied embedding table, a rotary cache): one row per token. A table that also
    feeds a product (a tied LM head) is read whole, once. Sizes come from each tensor's dims and
    dtype (the graph is loaded without its external data: no weight is read). None when the file
    is not a readable ONNX model (a peer's, a TensorRT plan).
    """
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # onnx raises DecodeError, OSError, ValueError... for what is not a model
        return None
    return graph_decode_bytes(model.graph)


def graph_decode_bytes(graph: Any) -> int:
    """:func:`decode_bytes` of an ``onnx.GraphProto`` (its subgraphs' uses included)."""
    tensors = {t.name: t for t in graph.initializer}
    row_only: dict[str, bool] = {}  # initializer -> every use so far reads one row
    for node in _nodes(graph):
        for index, name in enumerate(node.input):
            if name in tensors:
                row_only[name] = row_only.get(name, True) and _reads_a_row(node, index)
    total = 0
    for name, rows in row_only.items():
        size, dims = _tensor_bytes(tensors[name]), list(tensors[name].dims)
        total += size // dims[0] if rows and dims and dims[0] > 0 else size
    return total


def _nodes(graph: Any):
    """Every node of ``graph`` and of the subgraphs in its nodes' attributes (If, Loop, Scan)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _nodes(sub)


def _reads_a_row(node: Any, index: int) -> bool:
    if index not in ROW_GATHERS.get(node.op_type, ()):
        return False
    axis_name = "gather_axis" if node.op_type == "GatherBlockQuantized" else "axis"
    axis = next((a.i for a in node.attribute if a.name == axis_name), 0)
    return axis == 0  # rows along the first axis: one per token id


def _tensor_bytes(tensor: Any) -> int:
    import onnx

    count = int(np.prod(tensor.dims, dtype=np.int64)) if len(tensor.dims) else 1
    if tensor.data_type in HALF_BYTE_TYPES:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


# ---- memory bandwidth ----------------------------------------------------------------------------

VECTOR = 1024  # columns of each thread's matrix: rows of 4 KiB, read start to end


def measure_bandwidth(threads: int | None = None, mb_per_thread: int | None = None, repeats: int = 5) -> dict[str, Any]:
    """This machine's memory bandwidth as decoding meets it: ``{"read_gbs", "copy_gbs", "threads",
    "mb_per_thread", "method"}``.

    Decoding streams the weights: every step reads each byte once and writes next to nothing. So
    the figure that bounds it (``read_gbs``) is a streaming read: each thread multiplies its own
    float32 matrix, far larger than any cache, by a vector (``chunk @ vector``: matrix-vector is
    what a decode step's MatMuls are, at memory speed; NumPy releases the GIL inside it, so the
    threads read in parallel), all threads at once, best of ``repeats`` rounds (interference only
    ever slows a round down). ``copy_gbs`` (read + written bytes of a copy within each buffer) is
    kept beside it: it is what ``numpy.copyto`` benchmarks report, and it understates the read
    figure, since every written line is first read into the cache (write-allocate) and the writes
    share the bus with the reads.
    """
    threads = threads or _cores()
    mb = mb_per_thread or min(256, max(32, 2048 // threads))  # 2 GiB at most in all, each far above L3
    chunks = [np.ones((mb * 2**20 // (4 * VECTOR), VECTOR), dtype=np.float32) for _ in range(threads)]  # pages touched
    vector, outs = np.ones(VECTOR, dtype=np.float32), [np.empty(len(c), dtype=np.float32) for c in chunks]
    with _one_blas_thread() as pinned:
        read = _best(repeats, [lambda c=c, o=o: np.matmul(c, vector, out=o) for c, o in zip(chunks, outs)])
    half = len(chunks[0]) // 2
    copy = _best(repeats, [lambda c=c: np.copyto(c[half:2 * half], c[:half]) for c in chunks])
    nbytes = chunks[0].nbytes * threads
    method = (f"float32 matrix @ vector, {mb} MiB per thread, {threads} threads, best of {repeats}"
              + ("" if pinned else "; BLAS threads not pinned (no threadpoolctl)"))
    return {"read_gbs": nbytes / read / 1e9, "copy_gbs": 2 * chunks[0][:half].nbytes * threads / copy / 1e9,
            "threads": threads, "mb_per_thread": mb, "method": method}


def machine_bandwidth(threads: int | None = None, refresh: bool = False) -> dict[str, Any]:
    """:func:`measure_bandwidth` of this machine, cached under ``cache_dir()/bandwidth`` and keyed
    by CPU model, cores and threads; ``refresh`` measures again and replaces the cached figure.

    Returns the record (``read_gbs``, ``copy_gbs``, ``method``, ``measured_at``, the key) with
    ``cached``: whether it came from the cache.
    """
    from edgekit._files import cache_dir

    key = {"cpu_model": _cpu()[0], "cores": _cores(), "threads": threads or _cores()}
    path = cache_dir() / "bandwidth" / (hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16] + ".json")
    record = None if refresh else _cached(path, key)
    if record is not None and not _busier(record.get("load_average"), key["cores"]):
        return {**record, "cached": True}
    load = load_average()  # before: the probe's own threads raise it
    record = {**key, **measure_bandwidth(key["threads"]), "load_average": load,
              "measured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # another bench may write the same key
    partial.write_text(json.dumps(record, indent=2) + "\n")
    partial.replace(path)
    return {**record, "cached": False}


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none): a benchmark beside other work
    on a few cores measures the other work."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:  # not on this platform
        return None


def _busier(cached_load: float | None, cores: int) -> bool:
    """Whether a cached probe ran on a busy machine (load >= 3/4 of the cores) that is quieter now:
    other processes' memory traffic lowers the figure, so it is measured again."""
    now = load_average()
    return cached_load is not None and now is not None and cached_load >= 0.75 * cores and now < cached_load - 0.5


def _cached(path: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` if it is one, for ``key``; a damaged file is measured again."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(record, dict) and all(record.get(k) == v for k, v in key.items())
    return record if ok and isinstance(record.get("read_gbs"), (int, float)) and record["read_gbs"] > 0 else None


class _one_blas_thread:
    """One BLAS thread per call while inside (threadpoolctl, when installed); ``as`` gives whether.

    Each of our threads streams its own matrix; BLAS's own pool on top would put two threads on
    every core (half the read rate, measured on 2 cores).
    """

    def __enter__(self) -> bool:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:
            self.limits = None
            return False
        self.limits = threadpool_limits(1, user_api="blas")
        return True

    def __exit__(self, *exc: object) -> None:
        if self.limits is not None:
            self.limits.restore_original_limits()


def _best(repeats: int, work: list[Callable[[], Any]]) -> float:
    """The shortest of ``repeats`` rounds, each running every task in its own thread at once."""
    return min(_round(work) for _ in range(repeats))


def _round(work: list[Callable[[], Any]]) -> float:
    barrier = threading.Barrier(len(work) + 1)

    def run(task: Callable[[], Any]) -> None:
        barrier.wait()
        task()

    workers = [threading.Thread(target=run, args=(task,)) for task in work]
    for worker in workers:
        worker.start()
    barrier.wait()
    start = time.perf_counter()
    for worker in workers:
        worker.join()
    return time.perf_counter() - start
