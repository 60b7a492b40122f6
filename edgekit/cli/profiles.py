"""``edgekit profiles list|show``."""

from __future__ import annotations

import sys

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli._output import print_json

app = typer.Typer(help="Hardware profiles: list the shipped ones, show one.", no_args_is_help=True)


@app.command("list")
def list_cmd(json_out: bool = typer.Option(False, "--json", help="Print a JSON list.")) -> None:
    """List the shipped hardware profiles."""
    from edgekit.profiles import list_profiles

    profiles = list_profiles()
    if json_out:
        print_json([p.to_dict() for p in profiles])
        return
    # Light borders and lists that wrap between items, so that 80 columns show every value whole;
    # the name, which users copy into --profile, never wraps.
    table = Table(box=box.SIMPLE_HEAD)
    table.add_column("name", no_wrap=True)
    for header, widest_word in (("device", "avx512_vnni"), ("memory", "307.2 GB/s"), ("precisions", "fp32,"),
                                ("runtimes", "ort-tensorrt,")):
        table.add_column(header, min_width=len(widest_word))
    for p in profiles:
        hw = p.hardware
        arch = f"sm_{hw['compute_capability'].replace('.', '')}" if p.is_gpu else " ".join(hw["cpu_flags"])
        table.add_row(escape(p.name), escape(f"{p.device} {arch}"),
                      f"{hw['memory_gb']:g} GB\n{hw['memory_bandwidth_gbs']:g} GB/s",
                      ", ".join(hw["precisions"]), ", ".join(p.defaults["runtimes"]))
    Console().print(table)


@app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="A shipped profile name or a path to a .toml file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one profile, validated: its TOML file as it is, so `show NAME > board.toml` makes a profile to edit."""
    from edgekit.profiles import load_profile

    profile = load_profile(name)
    if json_out:
        print_json(profile.to_dict())
        return
    text = profile.path.read_text()
    if not sys.stdout.isatty():  # a file or a pipe: the bytes of the TOML, not a rendering wrapped to 80 columns
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from rich.syntax import Syntax

    Console().print(Syntax(text, "toml", background_color="default"), soft_wrap=True)
