"""One cell of a sweep: (profile, precision, quantization) built [+ quality] [+ bench] from one export.

    Cell ─key (export digest + profile contents + settings + edgekit version)─> id (16 hex)
    job (plain data) ─run_cell (a Ray task, or in-process)─> result dict  (+ the build folder as a tar
                                                                          when OUT is not on the worker's disk)

A cell's id is its content address: the same export, profile file and settings give the same id on
any machine, so ``OUT/cells/<id>/`` holding an ``ok`` ``cell.json`` means the cell is done.
The same ``run_cell`` runs as a Ray task and under ``--local``; it imports Ray only to fetch an
export shipped through the object store.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgekit._files import sha256_file
from edgekit.types import SIDECAR

CELL_FILE = "cell.json"
ENGINE_DIR = "engine"
MARKER = ".edgekit-sweep"  # in OUT: a worker that can read it (same token) writes there directly


@dataclass(frozen=True)
class Cell:
    """What to build; None means the profile's default (as ``edgekit build`` without the option)."""

    profile: str  # a shipped profile's name or a .toml path
    precision: str | None = None
    quantization: str | None = None

    @property
    def label(self) -> str:
        return f"{Path(self.profile).stem}/{self.precision or 'default'}/{self.quantization or 'default'}"


@dataclass(frozen=True)
class BenchSettings:
    """``--bench``: what each built cell is timed with (``edgekit bench`` of the engine alone)."""

    prompt_lengths: tuple[int, ...] = (128,)
    new_tokens: int = 32
    runs: int = 3
    warmup: int = 1
    threads: int | None = None


def export_digest(export: Path) -> str:
    """sha256 over the export's files (names and contents): what makes two exports the same."""
    digest = hashlib.sha256()
    for path in sorted(p for p in export.iterdir() if p.is_file()):
        digest.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def cell_key(cell: Cell, export_sha: str, profile: dict[str, Any], quality_sha: str | None,
             bench: BenchSettings | None) -> dict[str, Any]:
    """Everything a cell's result depends on, as data; its sha256 is the cell's id."""
    from edgekit import __version__

    profile = {k: v for k, v in profile.items() if k != "path"}  # where the file lies does not matter
    return {"export_sha256": export_sha, "profile": profile, "precision": cell.precision,
            "quantization": cell.quantization, "quality_text_sha256": quality_sha,
            "bench": asdict(bench) if bench else None, "edgekit": __version__}


def cell_id(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Plan, build, then measure one cell; never raises for an EdgekitError (it becomes the result).

    ``job``: id, cell (Cell as a dict), export (path), export_sidecar_sha256, export_archive (None,
    or [object ref] of the export as a tar), profile_toml (text, for a profile given as a file),
    out (OUT), marker (token of OUT's marker), quality_text (text or None), bench (dict or None).
    """
    from edgekit.errors import EdgekitError

    started = time.monotonic()
    result = {"id": job["id"], **job["cell"], "node": socket.gethostname(), "pid": os.getpid(), "status": "ok"}
    with tempfile.TemporaryDirectory(prefix="edgekit-cell-") as scratch:
        scratch = Path(scratch)
        stage = "plan"
        try:
            export, profile = _inputs(job, scratch)
            cell_dir = _cell_dir(job, scratch)
            plan = _plan(export, profile, job["cell"])
            result.update(runtime=plan.runtime, precision_built=plan.precision, quantization_built=plan.quantization)
            stage = "build"
            result.update(_build(export, profile, job, cell_dir))
            if job["bench"] is not None:
                stage = "bench"
                result["bench"] = _bench(cell_dir / ENGINE_DIR, profile, job["bench"])
            if cell_dir.parent != Path(job["out"]) / "cells":  # OUT is elsewhere: send the build back
                result["archive"] = pack_folder(cell_dir / ENGINE_DIR)
        except EdgekitError as exc:
            from edgekit.engines import BuildRefused

            result.update(status="failed", stage=stage, error=exc.message, hint=exc.hint,
                          refused=stage == "plan" and isinstance(exc, BuildRefused))
        except Exception as exc:  # a bug or a crash in a vendor library: the sweep goes on, the report says it
            result.update(status="failed", stage=stage, error=f"{type(exc).__name__}: {exc}", hint=None, refused=False)
    result["seconds"] = round(time.monotonic() - started, 3)
    return result


def _inputs(job: dict[str, Any], scratch: Path) -> tuple[Path, str]:
    """The export and profile as this worker sees them: in place when visible and the same, else
    unpacked from the job (a worker on another machine without a shared filesystem)."""
    export = Path(job["export"])
    sidecar = export / SIDECAR
    if not (sidecar.is_file() and sha256_file(sidecar) == job["export_sidecar_sha256"]):
        if job["export_archive"] is None:
            from edgekit.errors import ArtifactError

            raise ArtifactError(f"export {export} is not on node {socket.gethostname()}",
                                "put it on a shared filesystem, or run the sweep with --ship-export")
        import ray

        export = unpack_folder(ray.get(job["export_archive"][0]), scratch / "export")
    profile = job["cell"]["profile"]
    if job["profile_toml"] is not None and not Path(profile).is_file():
        profile = str(scratch / Path(profile).name)
        Path(profile).write_text(job["profile_toml"])
    return export, profile


def _cell_dir(job: dict[str, Any], scratch: Path) -> Path:
    out = Path(job["out"])
    try:
        same = (out / MARKER).read_text() == job["marker"]
    except OSError:
        same = False
    folder = out / "cells" / job["id"] if same else scratch / "cell"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _plan(export: Path, profile: str, cell: dict[str, Any]):
    from edgekit.engines import QuantOptions, plan_build

    return plan_build(export, profile, precision=cell["precision"], quant=QuantOptions(cell["quantization"]))


def _build(export: Path, profile: str, job: dict[str, Any], cell_dir: Path) -> dict[str, Any]:
    from edgekit.engines import QuantOptions, build_engine

    cell, quality = job["cell"], None
    if job["quality_text"] is not None:
        quality = cell_dir.parent / f"{job['id']}-quality.txt"
        quality.write_text(job["quality_text"])
    try:
        # force: a folder left by an earlier attempt of this same cell (its id says so) is replaced
        engine = build_engine(export, profile, cell_dir / ENGINE_DIR, precision=cell["precision"], force=True,
                              quant=QuantOptions(cell["quantization"]), quality_text=quality)
    finally:
        if quality is not None:
            quality.unlink(missing_ok=True)
    details = engine.details
    return {"engine": f"cells/{job['id']}/{ENGINE_DIR}", "engine_bytes": _folder_bytes(cell_dir / ENGINE_DIR),
            "memory_bytes": details["memory"]["total_bytes"], "quality": details.get("quality")}


def _bench(engine: Path, profile: str, settings: dict[str, Any]) -> dict[str, Any]:
    from edgekit.bench import run_bench

    # The cell's profile, not the node's best fit: it names the engine and the datasheet bandwidth reported
    # beside the roofline, which is the node's own measured read bandwidth (a CPU cell) or that datasheet (GPU).
    report = run_bench(engine, profile=profile, prompt_lengths=settings["prompt_lengths"], new_tokens=settings["new_tokens"],
                       runs=settings["runs"], warmup=settings["warmup"], threads=settings["threads"])
    row = report.contenders[0]
    if row["error"]:
        from edgekit.errors import EdgekitError

        raise EdgekitError(f"bench of {engine} failed: {row['error']}", "run `edgekit bench` on the engine for details")
    return {k: row[k] for k in ("decode_tokens_per_s", "ttft_ms", "tpot_ms", "peak_rss_mb", "roofline_fraction")} | {
        "machine": report.machine.get("cpu_model"), "settings": report.settings}


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def pack_folder(folder: Path) -> bytes:
    """A folder's files as an uncompressed tar (weights do not compress), names relative to it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                tar.add(path, arcname=str(path.relative_to(folder)))
    return buffer.getvalue()


def unpack_folder(data: bytes, dest: Path) -> Path:
    """Unpack :func:`pack_folder`'s bytes into ``dest`` (created; plain files only, nothing outside it)."""
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        tar.extractall(dest, filter="data")  # refuses absolute names, `..`, links out and devices
    return dest


def write_result(out: Path, result: dict[str, Any], key: dict[str, Any]) -> None:
    """``OUT/cells/<id>/cell.json`` (through a temporary file: a crash leaves the old one or none)."""
    folder = out / "cells" / result["id"]
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CELL_FILE}.tmp"
    tmp.write_text(json.dumps({**result, "key": key}, indent=2, default=str) + "\n")
    os.replace(tmp, folder / CELL_FILE)


def read_result(out: Path, id_: str) -> dict[str, Any] | None:
    """The recorded result of cell ``id_``, when it is done: ok with its engine present, or refused
    by its plan (a plan is a function of what the id covers, so it would be refused again)."""
    folder = out / "cells" / id_
    try:
        result = json.loads((folder / CELL_FILE).read_text())
    except (OSError, ValueError):
        return None
    if result.get("status") == "ok" and (folder / ENGINE_DIR / SIDECAR).is_file():
        return result
    return result if result.get("refused") else None


def store_archive(out: Path, result: dict[str, Any]) -> None:
    """A worker's build sent back as bytes: unpack it to ``OUT/cells/<id>/engine`` (replacing an old one)."""
    data = result.pop("archive", None)
    if data is None:
        return
    target = out / "cells" / result["id"] / ENGINE_DIR
    tmp = unpack_folder(data, target.parent / f".{ENGINE_DIR}.{os.getpid()}.tmp")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
