"""``edgekit sweep EXPORT --profiles a,b --precisions ... --quant ... -o OUT``: every build of a fleet, on Ray."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from edgekit.cli._output import console, print_json
from edgekit.errors import EdgekitError


def sweep(
    export: Path = typer.Argument(..., help="An export folder (edgekit export)."),
    out: Path = typer.Option(..., "--out", "-o", help="Sweep folder: cells/<id>/ (engine + cell.json), sweep.json; reused by reruns."),
    profiles: str = typer.Option(None, "--profiles", help="Profiles, comma separated (names or .toml paths; default: this machine's)."),
    precisions: str = typer.Option("", "--precisions", help="Precisions, comma separated (default: each profile's)."),
    quant: str = typer.Option("", "--quant", help="none | int8 | int4, comma separated (default: each profile's)."),
    cells: str = typer.Option("", "--cells", help="More cells, comma separated PROFILE:PRECISION:QUANT (an empty part: the default)."),
    bench: bool = typer.Option(False, "--bench", help="Bench each built engine on its node (edgekit bench, engine alone)."),
    prompt_lengths: str = typer.Option("128", "--prompt-lengths", help="--bench: prompt lengths, comma separated."),
    new_tokens: int = typer.Option(32, "--new-tokens", help="--bench: tokens generated."),
    runs: int = typer.Option(3, "--runs", help="--bench: measured rounds."),
    quality: Path = typer.Option(None, "--quality", help="Measure each build against the PyTorch source on this text (needs the export extra on the nodes)."),
    ray_address: str = typer.Option(None, "--ray-address", help="A Ray cluster (e.g. auto, or ray://head:10001; default: a local instance)."),
    local: bool = typer.Option(False, "--local", help="Run the cells here, one after another, without Ray."),
    ship_export: bool = typer.Option(False, "--ship-export", help="Send the export to workers through Ray (no shared filesystem)."),
    timeout: float = typer.Option(None, "--timeout", help="Seconds for the whole sweep; cells still running then fail."),
    bundle: Path = typer.Option(None, "--bundle", help="Package the engines of every ok cell into this .edgepkg."),
    sign: Path = typer.Option(None, "--sign", help="--bundle: sign it with this private key (edgekit keygen)."),
    plot: Path = typer.Option(None, "--plot", help="Write a PNG of the table (needs the plot extra)."),
    force: bool = typer.Option(False, "--force", help="--bundle: replace an existing bundle."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
) -> None:
    """Build (and bench, and check the quality of) one export for many profiles at once, as Ray tasks."""
    from edgekit.sweep import BenchSettings, plan_cells, render_table, run_sweep, write_plot

    if local and (ray_address or ship_export):
        raise EdgekitError("--local runs without Ray: it takes no --ray-address or --ship-export",
                           "drop --local to run on Ray, or drop the Ray options")
    if plot is not None:
        from edgekit.bench.report import check_plotting

        check_plotting()  # before the builds, not after them
    grid = plan_cells(_profiles(profiles), _list(precisions), _list(quant), _cells(cells))
    settings = BenchSettings(tuple(_ints(prompt_lengths)), new_tokens, runs) if bench else None
    printer = console  # stderr, also with --json: stdout holds only the JSON

    def done(result: dict, finished: int, total: int) -> None:
        state = "[green]ok[/]" if result["status"] == "ok" else f"[red]failed[/] ({escape(result['stage'])})"
        printer.print(f"[{finished}/{total}] {escape(result['id'][:8])} {escape(_label(result))}: {state}")

    report = run_sweep(export, grid, out, bench=settings, quality_text=quality, address=ray_address, local=local,
                       ship_export=ship_export, timeout_s=timeout, on_result=done)
    wide = console if console.is_terminal else Console(stderr=True, highlight=False, width=200)
    if not json_out:
        wide.print(render_table(report))
    if plot is not None:
        write_plot(report, plot)
        printer.print(f"[green]plot[/] → {escape(str(plot))}")
    data = report.to_dict()
    if bundle is not None:
        from edgekit.sweep.report import pack_results

        info = pack_results(report, bundle, sign_with=sign, force=force)
        data["bundle"] = {"path": str(info.path), "engines": [e["id"] for e in info.engines]}
        printer.print(f"[green]bundle[/] → {escape(str(info.path))} ({len(info.engines)} engines)")
    printer.print(f"json → {escape(str(out / 'sweep.json'))}")
    if json_out:
        print_json(data)
    if report.failed:  # after the report: the built cells are kept, and scripts see that not all were
        first = report.failed[0]
        raise EdgekitError(f"{len(report.failed)} of {len(report.cells)} cells failed, first {first['id'][:8]} "
                           f"{_label(first)} ({first['stage']}): {first['error']}",
                           f"fix what the table says and rerun the same command: done cells ({len(report.ok)}) are kept")


def _label(result: dict) -> str:
    return f"{Path(result['profile']).stem}/{result['precision'] or 'default'}/{result['quantization'] or 'default'}"


def _list(text: str) -> list[str | None]:
    return [part.strip() for part in text.split(",") if part.strip()] or [None]


def _profiles(text: str | None) -> list[str]:
    if text:
        return [p for p in _list(text) if p]
    from edgekit.doctor import detect, fitting_profile

    here = fitting_profile(detect())
    if here is None:
        raise EdgekitError("no shipped profile fits this machine", "pass --profiles (edgekit profiles list)")
    return [here]


def _cells(text: str):
    from edgekit.sweep import Cell

    cells = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        fields = part.split(":")
        if len(fields) != 3 or not fields[0]:
            raise EdgekitError(f"--cells {part} is not PROFILE:PRECISION:QUANT",
                               "e.g. --cells l4:fp16:none,cpu-x86-64::int4 (an empty part: the profile's default)")
        cells.append(Cell(fields[0], fields[1] or None, fields[2] or None))
    return cells


def _ints(text: str) -> list[int]:
    try:
        return [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise EdgekitError(f"--prompt-lengths {text} is not a list of integers", "e.g. --prompt-lengths 128,512") from None
