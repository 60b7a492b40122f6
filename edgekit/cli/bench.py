"""``edgekit bench PATH``: edgekit against PyTorch and peers, alternating, with a table, JSON and a plot."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from edgekit.cli._output import console, print_json, quiet_libraries
from edgekit.errors import ConfigError


def bench(
    path: Path = typer.Argument(..., help="An export or build folder, or an .edgepkg bundle."),
    profile: str = typer.Option(None, "--profile", help="Profile whose datasheet bandwidth is reported beside the measured one, and whose engine a bundle opens (default: the one fitting this machine)."),
    prompt_lengths: str = typer.Option("128,512", "--prompt-lengths", help="Prompt lengths, comma separated; decode is measured after the first."),
    new_tokens: int = typer.Option(128, "--new-tokens", help="Tokens generated after the first prompt length."),
    runs: int = typer.Option(5, "--runs", help="Measured rounds (medians and percentiles over these)."),
    warmup: int = typer.Option(1, "--warmup", help="Rounds run first and not counted."),
    compare: str = typer.Option("", "--compare", help="Contenders besides edgekit: torch, optimum, genai[:int4]; NAME=PYTHON runs one under that interpreter; llamacpp[:Q4_0|Q8_0|f16|f32]=BIN_DIR runs llama.cpp's llama-server."),
    threads: int = typer.Option(None, "--threads", help="Intra-op threads for every contender (default: each runtime's own)."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    output: Path = typer.Option(None, "--output", "-o", metavar="FILE", help="Write the JSON report to FILE."),
    plot: Path = typer.Option(None, "--plot", metavar="FILE", help="Write a PNG plot (needs matplotlib: the plot extra)."),
    measure_bandwidth: bool = typer.Option(False, "--measure-bandwidth", help="Measure this machine's memory bandwidth again (streaming read, all threads) and refresh the cached figure the roofline uses."),
) -> None:
    """Time edgekit and its peers on one model: load, first token, prefill, decode, memory, roofline."""
    from edgekit.bench import render_table, run_bench, write_plot
    from edgekit.bench.report import check_plotting, check_replaceable
    from edgekit.cli._progress import progress_bar

    quiet_libraries()  # transformers' loading bars would tear through the progress bar
    lengths = _ints(prompt_lengths, "--prompt-lengths")
    specs = [s.strip() for s in compare.split(",") if s.strip()]
    # Before the runs, not after minutes of them.
    if plot is not None:
        check_plotting()
    for target in (output, plot):
        if target is not None:
            check_replaceable(target)
    with progress_bar(enabled=not json_out) as advance:
        report = run_bench(path, profile=profile, prompt_lengths=lengths, new_tokens=new_tokens, runs=runs,
                           warmup=warmup, compare=specs, threads=threads, measure_bandwidth=measure_bandwidth,
                           on_progress=advance)
    # Piped output (logs, CI) has no width of its own: keep the table whole rather than cut to 80 columns.
    wide = console if console.is_terminal else Console(stderr=True, highlight=False, width=240)
    wide.print(render_table(report))
    if plot is not None:
        write_plot(report, plot)
        console.print(f"[green]plot[/] → {escape(str(plot))}")
    if output is not None:
        report.write_json(output)
        console.print(f"[green]json[/] → {escape(str(output))}")
    if json_out:
        print_json(report.to_dict())


def _ints(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers", f"e.g. {option} 128,512") from None

