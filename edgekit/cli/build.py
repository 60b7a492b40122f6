"""``edgekit build EXPORT_DIR --profile P -o OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli._output import console, print_json
from edgekit.errors import EdgekitError


def build(
    export_dir: Path = typer.Argument(..., help="An export folder (edgekit export)."),
    profile: str = typer.Option(..., "--profile", help="A profile name (edgekit profiles list) or a .toml path."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (not needed with --dry-run)."),
    runtime: str = typer.Option(None, "--runtime", help="ort | ort-cpu | ort-cuda | ort-tensorrt | tensorrt (default: the profile's first)."),
    precision: str = typer.Option(None, "--precision", help="fp32 | fp16 | bf16 | fp8 | int8 (default: the profile's)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the checked build plan as JSON; build nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the build's sidecar as JSON."),
) -> None:
    """Compile an export for a hardware profile: ONNX Runtime sessions or a TensorRT plan."""
    from edgekit.build import build_engine, plan_build

    if dry_run:
        print_json(plan_build(export_dir, profile, runtime, precision).to_dict())
        return
    if out is None:
        raise EdgekitError("--out is required unless --dry-run", "e.g. -o builds/my-model-l4")
    with console.status(f"Building {export_dir} for {profile}..."):
        graph = build_engine(export_dir, profile, out, runtime=runtime, precision=precision, force=force)
    if json_out:
        print_json(graph.build)
        return
    b = graph.build
    console.print(f"[green]built[/] {export_dir} → {out}  ({b['runtime']}, {b['precision']}, profile {b['profile']}, "
                  f"{b['memory']['total_bytes'] / 1e6:.1f} MB planned)")
