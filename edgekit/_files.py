"""Atomic output folders: write to a temporary sibling, rename on success."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from edgekit.errors import OutputExistsError


def check_output(out: Path, force: bool) -> None:
    """Refuse an existing output unless ``force``."""
    if out.exists() and not force:
        raise OutputExistsError(f"output {out} already exists", "pass --force to replace it, or choose another -o")


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; move it to ``out`` only if the block succeeds.

    A failure (or Ctrl-C) removes the temporary folder, so nothing partial is left at ``out``.
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should read like any folder
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def resumable_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Like ``atomic_dir``, but the work folder is ``.<name>.partial`` beside ``out`` and survives
    an interruption (Ctrl-C, a kill), so the next run with the same ``out`` resumes in it.

    Errors still remove it: an export refused for bad input leaves nothing behind.
    """
    out = Path(out)
    check_output(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(exist_ok=True)
    try:
        yield work
    except KeyboardInterrupt:
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    old = out.with_name(f".{out.name}.old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def model_files(model: Path) -> list[Path]:
    """An ONNX model file and its external data file (``<name>.data``), those that exist."""
    return [p for p in (model, model.with_name(model.name + ".data")) if p.exists()]


def model_bytes(model: Path) -> int:
    """Bytes of a model file plus its external data."""
    return sum(p.stat().st_size for p in model_files(model))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
