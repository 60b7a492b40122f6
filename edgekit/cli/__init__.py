"""The ``edgekit`` command: one module per command, each a thin shell over a stage function.

Nothing here imports torch or transformers at module level, so ``edgekit --help`` is fast
and works on a device that has neither.
"""

from __future__ import annotations

import os
import sys

import typer

from edgekit import __version__
from edgekit.cli import bench as bench_cmd
from edgekit.cli import build as build_cmd
from edgekit.cli import doctor as doctor_cmd
from edgekit.cli import export as export_cmd
from edgekit.cli import package as package_cmd
from edgekit.cli import profiles as profiles_cmd
from edgekit.cli import run as run_cmd
from edgekit.cli import serve as serve_cmd
from edgekit.cli import sweep as sweep_cmd
from edgekit.cli import validate as validate_cmd
from edgekit.cli._help import plain_types
from edgekit.cli._output import print_error
from edgekit.errors import EdgekitError

plain_types()  # no `<bool>` beside every flag in --help

app = typer.Typer(
    name="edgekit",
    help="Take a PyTorch LLM to the hardware you own: export, validate, run.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"edgekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """edgekit: export → validate → run."""


app.command("export")(export_cmd.export)
app.command("run")(run_cmd.run)
app.command("validate")(validate_cmd.validate)
app.command("build")(build_cmd.build)
app.command("doctor")(doctor_cmd.doctor)
app.command("bench")(bench_cmd.bench)
app.command("package")(package_cmd.package)
app.command("inspect")(package_cmd.inspect)
app.command("verify")(package_cmd.verify)
app.command("keygen")(package_cmd.keygen)
app.command("serve")(serve_cmd.serve)
app.command("sweep")(sweep_cmd.sweep)
app.add_typer(profiles_cmd.app, name="profiles")


def main() -> None:
    """Console entry point: errors for users become 'error:' / 'hint:' lines and exit 1."""
    try:
        app()
    except EdgekitError as exc:
        if os.environ.get("EDGEKIT_DEBUG") == "1":
            raise
        print_error(exc)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print_error(EdgekitError("interrupted"))
        sys.exit(130)
