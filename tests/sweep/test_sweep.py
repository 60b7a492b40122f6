"""``edgekit sweep``: cells as Ray tasks on a local instance, failures reported, reruns skipped, table and bundle."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.sweep.ray_local import host_profile

CLI = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def _tokens(folder: Path, steps: int = 6) -> list[int]:
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine

    session = open_engine(folder, threads=1)
    try:
        return generate(session, [1, 2, 3, 4], steps, eos_ids=()).token_ids
    finally:
        session.close()


def _stats(folders: list[Path]) -> dict[str, tuple[int, int]]:
    """(inode, mtime_ns) of every file: a rebuild (atomic rename of a new folder) changes both."""
    return {str(p): (p.stat().st_ino, p.stat().st_mtime_ns) for f in folders for p in f.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def swept(ray_local, sweep_export, tmp_path_factory):
    """fp32 / int8 / int4 on the host profile as Ray tasks, plus a cell the profile refuses (fp16 on a
    CPU) and one for a profile no node of the cluster offers (l4)."""
    from edgekit.sweep import Cell, plan_cells, run_sweep

    host = host_profile()
    cells = plan_cells([host], ["fp32"], ["none", "int8", "int4"], extra=[Cell(host, "fp16", "none"), Cell("l4")])
    out = tmp_path_factory.mktemp("sweep") / "out"
    return cells, out, run_sweep(sweep_export, cells, out, timeout_s=300)


def test_cells_run_as_ray_tasks_and_failures_do_not_stop_the_sweep(swept, sweep_export):
    _, out, report = swept
    assert report.counts() == {"ok": 3, "failed": 2, "cached": 0, "ran": 5}
    ok = {c["quantization"]: c for c in report.ok}
    assert set(ok) == {"none", "int8", "int4"}
    assert all(c["pid"] != os.getpid() for c in report.ok)  # built in Ray workers, not in this process
    refused, missing = report.failed
    assert refused["stage"] == "plan" and "precision fp16 is not supported" in refused["error"]
    assert missing["stage"] == "schedule" and "profile:l4" in missing["error"]
    assert "ray start --address" in missing["hint"]
    for quant, cell in ok.items():
        details = json.loads((out / cell["engine"] / "edgekit.json").read_text())["build"]
        assert details["quantization"] == quant and details["precision"] == "fp32"
    assert _tokens(out / ok["none"]["engine"]) == _tokens(sweep_export)  # fp32: what the export generates
    written = json.loads((out / "sweep.json").read_text())
    assert written["counts"]["ok"] == 3 and [c["id"] for c in written["cells"]] == [c["id"] for c in report.cells]


def test_table_and_bundle(swept, tmp_path):
    from rich.console import Console

    from edgekit.bundle import inspect_bundle, open_bundle
    from edgekit.sweep import render_table
    from edgekit.sweep.report import pack_results

    _, out, report = swept
    console = Console(record=True, width=200)
    console.print(render_table(report))
    text = console.export_text()
    assert "3 ok, 2 failed" in text and "precision fp16 is not supported" in text and "profile:l4" in text
    info = pack_results(report, tmp_path / "fleet.edgepkg")
    assert sorted(e["quantization"] for e in inspect_bundle(info.path).engines) == ["int4", "int8", "none"]
    assert len(_tokens(open_bundle(info.path))) == 6


def test_a_rerun_does_no_work(swept, sweep_export):
    from edgekit.sweep import run_sweep

    cells, out, first = swept
    engines = [out / c["engine"] for c in first.ok]
    before = _stats(engines)
    again = run_sweep(sweep_export, cells, out, timeout_s=60)
    # ok cells and the refused one are done; the cell no node could take is tried again (fails at once)
    assert again.counts() == {"ok": 3, "failed": 2, "cached": 4, "ran": 1}
    assert [c for c in again.cells if not c["cached"]][0]["stage"] == "schedule"
    assert _stats(engines) == before


def test_a_worker_without_the_export_or_out_gets_them_through_ray(ray_local, sweep_export, tmp_path):
    """A node with no shared filesystem: the export arrives through the object store, the build comes back."""
    from edgekit._files import sha256_file
    from edgekit.sweep.cells import pack_folder, run_cell, store_archive

    job = {"id": "0123456789abcdef", "cell": {"profile": host_profile(), "precision": "fp32", "quantization": "int8"},
           "export": str(tmp_path / "not-on-this-node"), "export_sidecar_sha256": sha256_file(sweep_export / "edgekit.json"),
           "export_archive": [ray_local.put(pack_folder(sweep_export))], "profile_toml": None,
           "out": str(tmp_path / "driver-out"), "marker": "the driver's token", "quality_text": None, "bench": None}
    result = ray_local.get(ray_local.remote(run_cell).options(num_cpus=1).remote(job), timeout=120)
    assert result["status"] == "ok", result
    assert isinstance(result.get("archive"), bytes) and not (tmp_path / "driver-out").exists()
    store_archive(tmp_path / "driver-out", result)
    assert len(_tokens(tmp_path / "driver-out" / result["engine"])) == 6


def test_ids_are_content_addresses(sweep_export, tmp_path):
    import shutil

    from edgekit.profiles import load_profile
    from edgekit.sweep.cells import BenchSettings, Cell, cell_id, cell_key, export_digest

    copy = Path(shutil.copytree(sweep_export, tmp_path / "moved"))
    profile = load_profile(host_profile()).to_dict()
    cell = Cell(host_profile(), "fp32", "int4")
    same = cell_id(cell_key(cell, export_digest(copy), profile, None, None))
    assert same == cell_id(cell_key(cell, export_digest(sweep_export), profile, None, None))  # the path is not content
    assert same != cell_id(cell_key(cell, export_digest(sweep_export), profile, None, BenchSettings()))
    (copy / "tokenizer_config.json").write_text("{}")
    assert export_digest(copy) != export_digest(sweep_export)


def _edgekit(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_cli_local_sweep_with_bench_plot_bundle_and_a_failed_cell(sweep_export, tmp_path):
    out, host = tmp_path / "out", host_profile()
    result = _edgekit("sweep", str(sweep_export), "-o", str(out), "--local", "--profiles", host, "--precisions", "fp32",
                      "--quant", "int4", "--cells", f"{host}:fp16:none", "--bench", "--prompt-lengths", "8",
                      "--new-tokens", "4", "--runs", "1", "--plot", str(tmp_path / "sweep.png"),
                      "--bundle", str(tmp_path / "b.edgepkg"), "--json")
    assert result.returncode == 1, result.stderr  # not every cell was built
    assert "failed (plan)" in result.stderr and "Traceback" not in result.stderr
    assert "error: 1 of 2 cells failed" in result.stderr and "precision fp16 is not supported" in result.stderr
    assert "hint: fix what the table says and rerun the same command: done cells (1) are kept" in result.stderr
    data = json.loads(result.stdout)  # the report, all the same
    assert data["counts"] == {"ok": 1, "failed": 1, "cached": 0, "ran": 2} and data["settings"]["executor"] == "local"
    assert data["cells"][0]["bench"]["decode_tokens_per_s"]["median"] > 0
    assert data["bundle"]["engines"] == [host]
    assert (tmp_path / "sweep.png").read_bytes().startswith(b"\x89PNG")


def test_cli_bad_cells_and_profiles_fail_before_writing(sweep_export, tmp_path):
    bad = _edgekit("sweep", str(sweep_export), "-o", str(tmp_path / "o"), "--local", "--cells", "l4:fp16")
    assert bad.returncode == 1
    assert "error: --cells l4:fp16 is not PROFILE:PRECISION:QUANT" in bad.stderr and "hint: e.g. --cells" in bad.stderr
    unknown = _edgekit("sweep", str(sweep_export), "-o", str(tmp_path / "o"), "--local", "--profiles", "l5")
    assert unknown.returncode == 1 and "error:" in unknown.stderr and "l5" in unknown.stderr
    assert not (tmp_path / "o").exists()


def test_cli_refuses_an_out_folder_that_is_not_a_sweep(sweep_export, tmp_path):
    """A sweep writes cells/ and sweep.json into OUT: a folder of someone else's is left as it was."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "sweep.json").write_text("not edgekit's")
    result = _edgekit("sweep", str(sweep_export), "-o", str(mine), "--local", "--profiles", host_profile(),
                      "--precisions", "fp32", "--quant", "none")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: -o {mine} exists and is not an edgekit sweep folder" in " ".join(result.stderr.split())
    assert "hint: pass a new or empty folder" in result.stderr
    assert sorted(p.name for p in mine.iterdir()) == ["sweep.json"] and (mine / "sweep.json").read_text() == "not edgekit's"
