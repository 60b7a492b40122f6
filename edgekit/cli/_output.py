"""Printing helpers shared by the commands (only the CLI prints)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click
import typer
from rich.console import Console
from rich.markup import escape

from edgekit.errors import EdgekitError

console = Console(stderr=True, highlight=False)


def print_error(exc: EdgekitError) -> None:
    """``error: ...`` and ``hint: ...`` on stderr."""
    # Messages quote user input and install commands (`pip install 'edgekit-llm[export]'`): never markup.
    console.print(f"[bold red]error:[/] {escape(exc.message)}", soft_wrap=True)
    if exc.hint:
        console.print(f"[bold]hint:[/] {escape(exc.hint)}", soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else there."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


@contextmanager
def json_errors(enabled: bool, fields: dict[str, Any] | None = None) -> Iterator[None]:
    """With ``--json``, a failure still prints one JSON object on stdout: ``fields`` (what was done so far)
    plus ``error`` and ``hint``. The exception then propagates, so stderr keeps its ``error:`` line and
    the exit status its value: programs reading stdout never get nothing."""
    try:
        yield
    except (Exception, KeyboardInterrupt) as exc:
        if enabled and not isinstance(exc, (typer.Exit, click.exceptions.Exit, click.ClickException)):
            if isinstance(exc, EdgekitError):
                error, hint = exc.message, exc.hint
            elif isinstance(exc, KeyboardInterrupt):
                error, hint = "interrupted", None
            else:  # a bug: the traceback follows on stderr
                error, hint = f"{type(exc).__name__}: {exc}", "please report this with the traceback (EDGEKIT_DEBUG=1)"
            print_json({**(fields or {}), "error": error, "hint": hint})
        raise


def quiet_libraries() -> None:
    """Keep torch / transformers chatter (progress bars, notices) off the user's screen."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")  # torch/transformers deprecation notices are not the user's to fix

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # `import torch` resets the levels of its registered loggers (torch.onnx, torch.export), so the
    # setLevel below only holds once torch is in; before that, TORCH_LOGS is what its set-up reads
    # ("-onnx": errors only, e.g. no "torchvision is not installed" on every export). A user's own
    # TORCH_LOGS wins.
    os.environ.setdefault("TORCH_LOGS", "-onnx,-export")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
