"""The progress bar of every long command, on stderr, driven by the library's ``on_progress`` callbacks.

The library never prints: its long functions (``build_engine``, ``quantize_model``,
``measure_quality``, ``run_bench``) call ``on_progress(what, done, total)``. The commands own
the display, and this is the one place it is made. It stays off when stderr is not a terminal
(logs, CI: a bar there is noise) and when the command prints ``--json`` on stdout.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from edgekit.cli import _output

Update = Callable[[str, int, int], None]  # (what, done, total); total 0: a step of unknown length


@contextmanager
def progress_bar(enabled: bool = True, console: Console | None = None) -> Iterator[Update]:
    """Yield the ``on_progress`` callback for a transient bar on ``console`` (default: stderr's).

    With ``enabled`` false, or a console that is not a terminal, the callback does nothing.
    """
    console = console or _output.console
    if not enabled or not console.is_terminal:
        yield lambda what, done, total: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("starting", total=None)
        shown = [""]

        def update(what: str, done: int, total: int) -> None:
            # A new step is drawn at once, even one shorter than the 10 Hz refresh; counts wait for it.
            progress.update(task, description=escape(what), completed=done, total=total or None,
                            refresh=what != shown[0])
            shown[0] = what

        yield update

