"""Output paths edgekit writes: atomic (write to a temporary sibling, rename on success), and
replaced with ``--force`` only when edgekit wrote what is there.

``kind`` names what a path must hold for ``--force`` to replace it: a folder whose
``edgekit.json`` says that kind ("export", "build"), or a bundle file. ``None`` marks a
location that only edgekit writes (its own cache), which it may always replace.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tarfile
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from edgekit.errors import OutputExistsError

KINDS = ("export", "build", "bundle")
_BUNDLE_HEAD = "manifest.json"  # edgekit.bundle.archive.MANIFEST: the first member of every bundle


def check_output(out: Path, force: bool, kind: str | None = None, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse ``out`` when it is (or holds) one of ``inputs``, or exists and ``--force`` may not
    replace it: without ``force``, or when it is not an edgekit ``kind`` (see the module doc)."""
    out = Path(out)
    for source in map(Path, inputs):
        if _holds(out, source):
            raise OutputExistsError(f"output {out} would replace the input {source}",
                                    f"choose another -o, e.g. -o {_sibling(source)}")
    if not out.exists() and not out.is_symlink():
        return
    if not force:
        raise OutputExistsError(f"output {out} already exists", "pass --force to replace it, or choose another -o")
    found = written_kind(out)
    if kind is not None and found != kind:
        what = f"an edgekit {found}" if found else "not something edgekit wrote"
        raise OutputExistsError(f"--force replaces only an edgekit {kind}, and {out} is {what}",
                                "choose another -o (edgekit never deletes what it did not write)")


def written_kind(path: Path) -> str | None:
    """"export", "build" or "bundle" when edgekit wrote ``path``, else None."""
    if path.is_symlink():
        return None
    if path.is_dir():
        try:
            kind = json.loads((path / "edgekit.json").read_text()).get("kind")
        except (OSError, ValueError, AttributeError):
            return None
        return kind if kind in KINDS else None
    try:
        with tarfile.open(path, "r:") as tar:
            first = tar.next()
    except (OSError, tarfile.TarError):
        return None
    return "bundle" if first is not None and first.name == _BUNDLE_HEAD else None


def _holds(out: Path, source: Path) -> bool:
    """Whether replacing ``out`` would remove ``source`` (the same path, or a folder above it)."""
    out, source = out.resolve(), source.resolve()
    return out == source or out in source.parents


def _sibling(source: Path) -> str:
    source = Path(os.path.normpath(source))
    return str(source.with_name(source.name + "-edgekit")) if source.name else "OUT"


def _aside(out: Path) -> Path:
    """A fresh hidden name beside ``out`` to move the old output to (never an existing path)."""
    return out.with_name(f".{out.name}.{uuid.uuid4().hex[:12]}.old")


def _replace(out: Path, new: Path) -> None:
    """Put ``new`` at ``out``; an old ``out`` (checked by ``check_output``) is removed after."""
    if not out.exists() and not out.is_symlink():
        new.rename(out)
        return
    old = _aside(out)
    out.rename(old)
    try:
        new.rename(out)
    except BaseException:
        old.rename(out)  # put the previous output back rather than leave it under a hidden name
        raise
    if old.is_symlink():
        old.unlink()
    else:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False, kind: str | None = None) -> Iterator[Path]:
    """Yield a temporary folder next to ``out``; move it to ``out`` only if the block succeeds.

    A failure (or Ctrl-C) removes the temporary folder, so nothing partial is left at ``out``.
    """
    out = Path(out)
    check_output(out, force, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp makes 0700; the result should read like any folder
    try:
        yield tmp
        check_output(out, force, kind)  # again: something may have appeared at ``out`` meanwhile
        _replace(out, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def resumable_dir(out: str | Path, force: bool = False, kind: str | None = None,
                  resumable: Callable[[Path], bool] = lambda work: True) -> Iterator[Path]:
    """Like ``atomic_dir``, but the work folder is ``.<name>.partial`` beside ``out`` and survives
    an interruption (Ctrl-C, a kill), so the next run with the same ``out`` resumes in it.

    Errors still remove it: an export refused for bad input leaves nothing behind, and so does
    a Ctrl-C before ``resumable(work)`` says the folder holds anything a rerun can use.
    """
    out = Path(out)
    check_output(out, force, kind)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = out.with_name(f".{out.name}.partial")
    work.mkdir(exist_ok=True)
    try:
        yield work
    except KeyboardInterrupt:
        if not resumable(work):
            shutil.rmtree(work, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    check_output(out, force, kind)
    _replace(out, work)


def cache_dir() -> Path:
    """edgekit's own cache: materialized presets, unpacked bundles (``EDGEKIT_CACHE``)."""
    return Path(os.environ.get("EDGEKIT_CACHE") or Path.home() / ".cache" / "edgekit")


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
