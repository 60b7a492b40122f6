"""Write a graph's weights to its external data file one tensor at a time, resumably.

Each initializer (a lazy recipe until now) is computed, written at a page-aligned offset
(so ONNX Runtime can memory-map it) and dropped before the next one, so memory stays near
the largest tensor. A journal beside the data records how many tensors are complete; a
run interrupted midway resumes after the last complete tensor when the layout (names,
shapes, dtypes, offsets) and the weights' identity are the same, and starts over otherwise.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path
from typing import Any

ALIGN = 4096  # page size: ONNX Runtime maps external data whose offset is page-aligned
INLINE_BYTES = 1024  # smaller tensors stay in the protobuf
JOURNAL = "weights.journal.json"
# Fault injection for the resume tests: a real signal to this process after N tensors.
_KILL_AFTER = int(os.environ.get("EDGEKIT_TEST_KILL_AFTER_TENSORS", "0"))
_KILL_SIGNAL = getattr(signal, "SIG" + os.environ.get("EDGEKIT_TEST_KILL_SIGNAL", "KILL"))


def write_weights(model: Any, folder: Path, data_name: str, identity: Any, progress: bool = True) -> dict[str, Any]:
    """Write ``model``'s large initializers to ``folder/data_name`` and point the model at them.

    ``identity`` names what the weights come from (checkpoint files, settings); with the
    layout it decides whether an existing journal can be resumed. Returns figures.
    """
    import onnx_ir as ir

    layout = _layout(model)
    digest = _digest(identity, layout)
    done = _resume_point(folder, digest)
    path = folder / data_name
    total = layout[-1][2] + layout[-1][3] if layout else 0
    with open(path, "r+b" if done and path.exists() else "wb") as data, _bar(progress, layout, done) as advance:
        data.truncate(_end(layout, done))
        for index in range(done, len(layout)):
            value, _, offset, length = layout[index]
            blob = value.const_value.tobytes()
            if len(blob) != length:
                from edgekit.errors import InternalError

                raise InternalError(f"{value.name}: {len(blob)} bytes computed, {length} expected")
            data.seek(offset)
            data.write(blob)
            data.flush()
            del blob
            _journal(folder, digest, index + 1)
            advance(length)
            if index + 1 == _KILL_AFTER:
                os.kill(os.getpid(), _KILL_SIGNAL)
        data.truncate(total)
    for value, _, offset, length in layout:
        tensor = value.const_value
        value.const_value = ir.ExternalTensor(data_name, offset, length, tensor.dtype, shape=tensor.shape,
                                              name=value.name, base_dir=folder)
    (folder / JOURNAL).unlink(missing_ok=True)
    return {"tensors": len(layout), "bytes": total, "resumed_after": done}


def _layout(model: Any) -> list[tuple[Any, str, int, int]]:
    """(value, name, offset, length) per external tensor, in graph order."""
    layout, offset = [], 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < INLINE_BYTES:
            continue
        layout.append((value, name, offset, tensor.nbytes))
        offset = -(-(offset + tensor.nbytes) // ALIGN) * ALIGN
    return layout


def _digest(identity: Any, layout: list) -> str:
    rows = [[name, str(v.const_value.dtype), list(v.const_value.shape), offset, length]
            for v, name, offset, length in layout]
    return hashlib.sha256(json.dumps([identity, rows], default=str).encode()).hexdigest()


def _end(layout: list, done: int) -> int:
    return 0 if done == 0 else layout[done - 1][2] + layout[done - 1][3]


def _resume_point(folder: Path, digest: str) -> int:
    try:
        journal = json.loads((folder / JOURNAL).read_text())
    except (OSError, ValueError):
        return 0
    return int(journal.get("done", 0)) if journal.get("plan") == digest else 0


def journaled_tensors(folder: Path) -> int:
    """How many tensors an interrupted write left complete in ``folder`` (0: nothing to resume)."""
    try:
        return int(json.loads((folder / JOURNAL).read_text()).get("done", 0))
    except (OSError, ValueError, AttributeError, TypeError):
        return 0


def _journal(folder: Path, digest: str, done: int) -> None:
    tmp = folder / (JOURNAL + ".tmp")
    tmp.write_text(json.dumps({"plan": digest, "done": done}))
    os.replace(tmp, folder / JOURNAL)  # atomic: a kill leaves the old or the new count, never half


class _bar:
    """A Rich progress bar: tensors done / total, bytes, rate, time left."""

    def __init__(self, enabled: bool, layout: list, done: int):
        self.enabled, self.layout, self.done = enabled, layout, done

    def __enter__(self):
        if not self.enabled:
            return lambda nbytes: None
        from rich.console import Console
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                                   TransferSpeedColumn)

        self.progress = Progress(TextColumn("weights {task.fields[tensors]}/%d tensors" % len(self.layout)),
                                 BarColumn(), DownloadColumn(binary_units=True), TransferSpeedColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True))
        total = sum(length for *_, length in self.layout)
        skipped = sum(length for *_, length in self.layout[: self.done])
        self.progress.start()
        self.task = self.progress.add_task("weights", total=total, completed=skipped, tensors=self.done)
        self.count = self.done
        return self._advance

    def _advance(self, nbytes: int) -> None:
        self.count += 1
        self.progress.update(self.task, advance=nbytes, tensors=self.count)

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.stop()
        return False
