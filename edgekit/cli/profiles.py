"""``edgekit profiles list|show``."""

from __future__ import annotations

import typer
from rich.console import Console
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
    table = Table("name", "device", "arch", "memory", "bandwidth", "precisions", "runtimes")
    for p in profiles:
        hw = p.hardware
        arch = f"sm_{hw['compute_capability'].replace('.', '')}" if p.is_gpu else "+".join(hw["cpu_flags"])
        table.add_row(p.name, p.device, arch, f"{hw['memory_gb']:g} GB", f"{hw['memory_bandwidth_gbs']:g} GB/s",
                      ",".join(hw["precisions"]), ",".join(p.defaults["runtimes"]))
    Console().print(table)


@app.command("show")
def show_cmd(
    name: str = typer.Argument(..., help="A shipped profile name or a path to a .toml file."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one profile, validated."""
    from edgekit.profiles import load_profile

    profile = load_profile(name)
    if json_out:
        print_json(profile.to_dict())
        return
    Console().print(profile.path.read_text(), markup=False, highlight=False)
