"""``run_sweep``: build [+ quality] [+ bench] one export for every profile × precision × quantization.

    export + grid ─plan_cells→ cells (content-addressed ids) ─skip done ones─┐
        ┌────────────────────────────────────────────────────────────────────┘
        └─ Ray tasks placed by resource profile:<name> (or in-process with local=True)
             ─> OUT/cells/<id>/{engine/, cell.json} ─> SweepReport: OUT/sweep.json, table, plot, bundle

A failed cell is a row of the report with its stage and error; the others go on. A rerun skips
every cell whose ``cell.json`` says it is done (and cells whose plan the profile refuses).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgekit._files import sha256_file
from edgekit.errors import ArtifactError, EdgekitError
from edgekit.sweep.cells import (MARKER, BenchSettings, Cell, cell_id, cell_key, export_digest, pack_folder,
                                 read_result, run_cell, store_archive, write_result)
from edgekit.sweep.report import SweepReport, render_table, write_plot
from edgekit.types import SIDECAR, ExportedGraph

__all__ = ["BenchSettings", "Cell", "SweepReport", "plan_cells", "render_table", "run_sweep", "write_plot"]

Done = Callable[[dict[str, Any], int, int], None]  # (result, finished, total)


def plan_cells(profiles: Sequence[str], precisions: Sequence[str | None] = (None,),
               quantizations: Sequence[str | None] = (None,), extra: Sequence[Cell] = ()) -> list[Cell]:
    """Every profile × precision × quantization, then ``extra`` cells, without repeats (order kept)."""
    grid = [Cell(p, precision, q) for p in profiles for precision in precisions or (None,)
            for q in quantizations or (None,)]
    return list(dict.fromkeys([*grid, *extra]))


def run_sweep(export: str | Path, cells: Sequence[Cell], out: str | Path, bench: BenchSettings | None = None,
              quality_text: str | Path | None = None, address: str | None = None, local: bool = False,
              ship_export: bool = False, timeout_s: float | None = None, cpus: int | None = None,
              on_result: Done | None = None) -> SweepReport:
    """Run every cell not already done in ``out``; returns the report (also written to ``out/sweep.json``).

    ``local``: in this process, one cell after another, without Ray. Otherwise each cell is a Ray task
    on ``address`` (default: a local instance with ``cpus`` CPUs) placed by ``profile:<name>``.
    ``ship_export``: send the export through Ray's object store to workers that cannot read its path.
    """
    export, out = Path(export), Path(out)
    graph = _check_export(export)
    keys, profiles, tomls = _keys(export, cells, bench, quality_text)  # bad profiles or text fail before OUT exists
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    marker = _mark(out)
    results, jobs = _done_and_todo(export, cells, keys, out, {"profile_toml": tomls, "marker": marker,
                                                                "quality_text": quality_text, "bench": bench})
    by_id = {cell_id(key): key for key in keys}
    total, finished = len(by_id), [len(results)]

    def done(result: dict[str, Any]) -> None:
        store_archive(out, result)
        result["cached"] = False
        write_result(out, result, by_id[result["id"]])
        results[result["id"]] = result
        finished[0] += 1
        if on_result:
            on_result(result, finished[0], total)

    if jobs:
        names = {cell_id(k): profiles[c.profile].name for c, k in zip(cells, keys)}
        _execute(jobs, names, profiles, export, (address, local, ship_export, timeout_s, cpus), done)
    ordered = [results[id_] for id_ in by_id if id_ in results]  # the cells' order, each id once
    report = SweepReport(export=str(export), model=graph.model.source, out=str(out), cells=tuple(ordered),
                         settings={"bench": _bench_dict(bench), "quality_text": str(quality_text) if quality_text else None,
                                   "executor": "local" if local else (address or "ray (local instance)")})
    report.write_json(out / "sweep.json")
    return report


def _done_and_todo(export: Path, cells: Sequence[Cell], keys: list[dict], out: Path,
                   common: dict[str, Any]) -> tuple[dict[str, dict], list[dict]]:
    """The results of cells already done (by id), and one job per other cell (a repeated id once)."""
    results: dict[str, dict[str, Any]] = {}
    jobs: dict[str, dict[str, Any]] = {}
    quality = common["quality_text"]
    for cell, key in zip(cells, keys):
        id_ = cell_id(key)
        if id_ in results or id_ in jobs:
            continue
        if (old := read_result(out, id_)) is not None:
            results[id_] = {**old, "cached": True}
            continue
        jobs[id_] = {"id": id_, "cell": _cell_dict(cell), "export": str(export.resolve()),
                     "export_sidecar_sha256": sha256_file(export / SIDECAR), "export_archive": None,
                     "profile_toml": common["profile_toml"][cell.profile], "out": str(out.resolve()),
                     "marker": common["marker"], "quality_text": Path(quality).read_text() if quality else None,
                     "bench": _bench_dict(common["bench"])}
    return results, list(jobs.values())


def _execute(jobs: list[dict[str, Any]], profile_names: dict[str, str], profiles: dict[str, Any], export: Path,
             how: tuple, done: Callable[[dict[str, Any]], None]) -> None:
    address, local, ship_export, timeout_s, cpus = how
    if local:
        for job in jobs:
            done(run_cell(job))
        return
    from edgekit.errors import require

    require("ray", "ray")
    from edgekit.sweep import ray_tasks

    started = ray_tasks.connect(address, _local_resources(profiles, cpus), cpus)
    try:
        if ship_export:
            archive = ray_tasks.ship(pack_folder(export))
            for job in jobs:
                job["export_archive"] = archive
        ray_tasks.run_tasks(jobs, profile_names, timeout_s, done)
    finally:
        if started:
            ray_tasks.disconnect()


def _local_resources(profiles: dict[str, Any], cpus: int | None) -> dict[str, float]:
    """What a local instance offers: every CPU profile of the sweep (builds for any CPU run anywhere),
    once per CPU; a GPU profile once, when it is this machine's."""
    import os

    from edgekit.doctor import detect, fitting_profile

    here = fitting_profile(detect())
    offer = {}
    for profile in profiles.values():
        if profile.device == "cpu":
            offer[f"profile:{profile.name}"] = float(cpus or os.cpu_count() or 1)
        elif profile.name == here:
            offer[f"profile:{profile.name}"] = 1.0
    return offer


def _keys(export: Path, cells: Sequence[Cell], bench: BenchSettings | None, quality_text):
    """Each cell's key, each profile (by how the cell names it), and each profile file's text (None for
    shipped ones: every worker has those)."""
    from edgekit.profiles import load_profile

    if quality_text and not Path(quality_text).is_file():
        raise EdgekitError(f"--quality {quality_text} is not a file", "pass a text file to measure quality on")
    export_sha = export_digest(export)
    quality_sha = sha256_file(Path(quality_text)) if quality_text else None
    profiles = {cell.profile: load_profile(cell.profile) for cell in cells}  # an unknown profile fails now
    tomls = {k: (Path(k).read_text() if k.endswith(".toml") else None) for k in profiles}
    keys = [cell_key(cell, export_sha, _profile_data(profiles[cell.profile]), quality_sha, bench) for cell in cells]
    return keys, profiles, tomls


def _profile_data(profile) -> dict[str, Any]:
    data = profile.to_dict()
    data["file_sha256"] = hashlib.sha256(Path(profile.path).read_bytes()).hexdigest()
    return data


def _check_export(export: Path) -> ExportedGraph:
    if not (export / SIDECAR).is_file():
        raise ArtifactError(f"{export} is not an export folder (no {SIDECAR})", "pass the folder `edgekit export` wrote")
    graph = ExportedGraph.load(export)
    if graph.kind == "build":
        raise ArtifactError(f"{export} is a build, not an export", "pass the export folder it was built from")
    return graph


def _check_out(out: Path) -> None:
    """OUT is new, empty, or a sweep's own folder (its marker): a sweep writes cells/ and sweep.json
    there, so any other folder is refused rather than written into."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MARKER).is_file())):
        raise EdgekitError(f"-o {out} exists and is not an edgekit sweep folder",
                           "pass a new or empty folder (a sweep's own folder resumes it)")


def _mark(out: Path) -> str:
    """The token a worker compares to see whether OUT is its own disk (same machine or shared filesystem)."""
    path = out / MARKER
    if not path.is_file():
        path.write_text(secrets.token_hex(16))
    return path.read_text()


def _cell_dict(cell: Cell) -> dict[str, Any]:
    return {"profile": cell.profile, "precision": cell.precision, "quantization": cell.quantization}


def _bench_dict(bench: BenchSettings | None) -> dict[str, Any] | None:
    from dataclasses import asdict

    return asdict(bench) if bench else None
