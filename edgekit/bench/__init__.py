"""``run_bench``: edgekit against its peers on one model, measured the same way, side by side.

    export/build folder ─load each contender─> rounds: for round, for contender, for prompt length
        ─> Measured per contender ─summarize─> BenchReport (JSON, table, plot)

Contenders alternate within each round, so drift (thermal, other processes) hits all alike;
the first ``warmup`` rounds are not counted. Decode metrics come from the first prompt length,
which generates ``new_tokens``; the other lengths generate one token (their time to first token).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.bench import metrics
from edgekit.bench.contenders import (Contender, ContenderFailed, EdgekitContender, PeerContender, RunTiming,
                                      TorchContender, make_contender)
from edgekit.bench.report import BenchReport, Measured, render_table, summarize, write_plot
from edgekit.errors import ArtifactError, ConfigError, EdgekitError
from edgekit.types import ExportedGraph

__all__ = ["BenchReport", "Contender", "ContenderFailed", "EdgekitContender", "PeerContender", "RunTiming",
           "TorchContender", "render_table", "run_bench", "write_plot"]

Progress = Callable[[str, int, int], None]  # (what, done, total)


def run_bench(
    path: str | Path,
    profile: str | None = None,
    prompt_lengths: Sequence[int] = (128, 512),
    new_tokens: int = 128,
    runs: int = 5,
    warmup: int = 1,
    compare: Sequence[str | Contender] = (),
    threads: int | None = None,
    measure_bandwidth: bool = False,
    on_progress: Progress | None = None,
) -> BenchReport:
    """Benchmark the export or build at ``path`` against ``compare`` (specs such as ``"torch"``,
    ``"genai:int4=/venv/bin/python"``, or ready :class:`Contender` objects).

    The roofline takes this machine's measured streaming-read bandwidth (probed once and cached;
    ``measure_bandwidth`` probes again), with ``profile``'s datasheet figure beside it (default:
    the profile fitting this machine; it also picks the engine out of a ``.edgepkg``).
    """
    from edgekit.doctor import detect, fitting_profile

    machine = detect()
    fitting = fitting_profile(machine)
    folder = open_path(path, profile)  # no --profile: the bundle picks what fits, as `edgekit run` would
    profile = profile or fitting
    graph = ExportedGraph.load(folder)
    lengths = _check_settings(graph, list(prompt_lengths), new_tokens, runs, warmup)
    contenders = [EdgekitContender(folder, threads)]
    contenders += [make_contender(c, graph, threads) if isinstance(c, str) else c for c in compare]
    _check_names(contenders)
    bandwidth = _bandwidth(profile, measure_bandwidth, threads, contenders[0])  # before the runs: a bad --profile fails fast
    load_before = metrics.load_average()
    measured = measure(contenders, make_prompts(graph.model.vocab_size, lengths), new_tokens, runs, warmup,
                       on_progress or (lambda *_: None))
    load_after = metrics.load_average()
    for contender, record in zip(contenders, measured):
        record.decode_bytes = _decode_bytes(contender)
    settings = {"path": str(path), "model": graph.model.source, "target": graph.target, "dtype": graph.dtype,
                "prompt_lengths": lengths, "new_tokens": new_tokens, "runs": runs, "warmup": warmup,
                "threads": threads, "profile": profile, **bandwidth,
                "load_average_before": load_before, "load_average_after": load_after}
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return BenchReport(_machine(machine, fitting), settings, summarize(measured, lengths, bandwidth["bandwidth_gbs"]), created)


def open_path(path: str | Path, profile: str | None) -> Path:
    """The folder to bench: ``path`` itself, or the engine a ``.edgepkg`` bundle holds for ``profile``."""
    if not str(path).endswith(".edgepkg"):
        return Path(path)
    try:
        from edgekit.bundle import open_bundle
    except ImportError:
        raise ArtifactError(f"{path} is an .edgepkg bundle, and this edgekit cannot open bundles yet",
                            "pass the export or build folder the bundle was packed from") from None
    return Path(open_bundle(path, profile))


def make_prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> dict[int, list[int]]:
    """Seeded token ids (fed directly: random-weight models need no real text), one prompt per length."""
    ids = np.random.default_rng(seed).integers(1, vocab_size, size=max(lengths))
    return {n: ids[:n].tolist() for n in lengths}


def measure(contenders: list[Contender], prompts: dict[int, list[int]], new_tokens: int, runs: int, warmup: int,
            progress: Progress) -> list[Measured]:
    """Load each contender, then run them alternately; a failing contender (but the first) is recorded."""
    records = [Measured(c.name, runs={n: [] for n in prompts}) for c in contenders]
    try:
        _rounds(contenders, records, prompts, new_tokens, runs, warmup, progress)
        for contender, record in zip(contenders, records):
            _attempt(contender, record, records, lambda c=contender, r=record: setattr(r, "memory", c.memory()))
    finally:  # worker processes end even when the first contender fails
        for contender in contenders:
            contender.close()
    return records


def _rounds(contenders: list[Contender], records: list[Measured], prompts: dict[int, list[int]], new_tokens: int,
            runs: int, warmup: int, progress: Progress) -> None:
    total, done = len(contenders) * (1 + (warmup + runs) * len(prompts)), 0
    for contender, record in zip(contenders, records):
        progress(f"loading {contender.name}", done, total)
        _attempt(contender, record, records, lambda c=contender, r=record: setattr(r, "loaded", c.load()))
        done += 1
    first_length = next(iter(prompts))
    for round_ in range(warmup + runs):
        label = "warmup" if round_ < warmup else f"run {round_ - warmup + 1}/{runs}"
        for contender, record in zip(contenders, records):
            for length, ids in prompts.items():
                progress(f"{contender.name} · {label} · prompt {length}", done, total)
                count = new_tokens if length == first_length else 1
                _attempt(contender, record, records, lambda c=contender, r=record, n=length, i=ids, k=count:
                         _run_once(c, r, n, i, k, counted=round_ >= warmup))
                done += 1
    progress("done", total, total)


def _run_once(contender: Contender, record: Measured, length: int, ids: list[int], count: int, counted: bool) -> None:
    timing = contender.run(ids, count)
    if counted:
        record.runs[length].append(timing)


def _attempt(contender: Contender, record: Measured, records: list[Measured], step: Callable[[], Any]) -> None:
    """Run one step of a contender unless it already failed; its failure is recorded, not raised,
    and the contender closed at once (its memory would weigh on the others' runs).

    The first contender (edgekit) is the yardstick of every ratio: its failure stops the bench.
    """
    if record.error is not None:
        return
    try:
        step()
    except Exception as exc:
        if record is records[0]:
            raise
        record.error = exc.message if isinstance(exc, EdgekitError) else f"{type(exc).__name__}: {exc}"
        contender.close()


def _check_settings(graph: ExportedGraph, lengths: list[int], new_tokens: int, runs: int, warmup: int) -> list[int]:
    """Refuse settings that cannot give a measurement; returns the prompt lengths."""
    if not lengths or min(lengths) < 1 or len(set(lengths)) != len(lengths):
        raise ConfigError(f"--prompt-lengths {lengths} must be distinct positive numbers", "e.g. --prompt-lengths 128,512")
    if new_tokens < 2:
        raise ConfigError(f"--new-tokens {new_tokens} leaves nothing to decode", "use 2 or more, e.g. --new-tokens 128")
    if runs < 1 or warmup < 0:
        raise ConfigError(f"--runs {runs} / --warmup {warmup}: need runs >= 1 and warmup >= 0", "e.g. --runs 5 --warmup 1")
    limit = graph.model.max_position_embeddings
    if lengths[0] + new_tokens > limit or max(lengths) + 1 > limit:
        raise ConfigError(f"prompt {lengths[0]} + {new_tokens} new tokens (or prompt {max(lengths)}) exceeds "
                          f"the model's {limit} positions", "use shorter --prompt-lengths or fewer --new-tokens")
    return lengths


def _check_names(contenders: list[Contender]) -> None:
    names = [c.name for c in contenders]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"contender {twice[0]!r} is named twice", "list each contender once in --compare")


def _bandwidth(profile: str | None, measure_it: bool, threads: int | None, first: Contender) -> dict[str, Any]:
    """The roofline's bandwidth, for the report's settings: this machine's streaming-read GB/s
    (:func:`~edgekit.bench.metrics.machine_bandwidth`, cached; probed again with ``measure_it``),
    its copy GB/s and the profile's datasheet figure beside it. An engine on a GPU keeps the
    datasheet figure: the probe reads host memory, not the device's."""
    from edgekit.bench.metrics import machine_bandwidth

    datasheet, name = None, None
    if profile is not None:  # loaded first: a bad --profile fails before the probe
        from edgekit.profiles import load_profile

        loaded = load_profile(profile)
        datasheet, name = loaded.hardware.get("memory_bandwidth_gbs"), loaded.name
    settings = {"bandwidth_gbs": datasheet, "bandwidth_source": f"profile {name} datasheet" if datasheet else None,
                "datasheet_gbs": datasheet, "copy_gbs": None, "bandwidth_measured_at": None,
                "bandwidth_load_average": None}
    if isinstance(first, EdgekitContender) and first.tracker.device:
        return settings
    probe = machine_bandwidth(threads, refresh=measure_it)
    cached = ", cached" if probe["cached"] else ""
    return {**settings, "bandwidth_gbs": probe["read_gbs"], "bandwidth_source": f"measured: {probe['method']}{cached}",
            "copy_gbs": probe["copy_gbs"], "bandwidth_measured_at": probe["measured_at"],
            "bandwidth_load_average": probe.get("load_average")}


def _decode_bytes(contender: Contender) -> int | None:
    """Weight bytes one decode step reads, from the ONNX graph of an edgekit contender; None for
    peers (the report then takes their file bytes)."""
    from edgekit.bench.metrics import decode_bytes

    if not isinstance(contender, EdgekitContender):
        return None
    return decode_bytes(contender.engine.graph.model_path)


def _machine(machine: Any, fitting: str | None) -> dict[str, Any]:
    """The parts of ``edgekit doctor`` that explain a number, with the profile that fits."""
    data = machine.to_dict()
    keys = ("cpu_model", "arch", "cores", "ram_gb", "gpus", "onnxruntime_version", "onnxruntime_package",
            "driver_version", "cuda_version", "tensorrt_version")
    return {**{k: data[k] for k in keys}, "profile": fitting}
