"""Printing helpers shared by the commands (only the CLI prints)."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from edgekit.errors import EdgekitError

console = Console(stderr=True, highlight=False)


def print_error(exc: EdgekitError) -> None:
    """``error: ...`` and ``hint: ...`` on stderr."""
    console.print(f"[bold red]error:[/] {exc.message}", soft_wrap=True)
    if exc.hint:
        console.print(f"[bold]hint:[/] {exc.hint}", soft_wrap=True)


def print_json(data: Any) -> None:
    """Machine-readable output on stdout, nothing else there."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
    sys.stdout.flush()


def quiet_libraries() -> None:
    """Keep torch / transformers chatter (progress bars, notices) off the user's screen."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")  # torch/transformers deprecation notices are not the user's to fix

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
