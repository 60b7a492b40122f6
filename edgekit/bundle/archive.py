"""Writing and reading ``.edgepkg`` files: an uncompressed tar, ``manifest.json`` first.

Writing is atomic (a temporary sibling, then ``os.replace``). Reading never calls ``extractall``:
each member is checked (a normalized relative path, a regular file, listed in the manifest, the
size the manifest says, not seen before) and its bytes are copied and hashed by hand into the
one folder asked for, so nothing lands outside it and nothing unverified is left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tarfile
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgekit.bundle.manifest import MANIFEST, REPACKAGE, SIGNATURE, BundleError, unsafe_path

MAX_MANIFEST_BYTES = 64 << 20
SIGNATURE_BYTES = 64  # an ed25519 signature
CHUNK = 1 << 20


# ---------------------------------------------------------------- writing


def write_bundle(out: Path, manifest: bytes, signature: bytes | None, members: list[tuple[str, Path, dict]]) -> None:
    """Write ``out``: manifest.json, manifest.sig when signed, then ``members`` (name, file, entry).

    A failure (or Ctrl-C) removes the temporary file, so nothing is left at ``out``.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, MANIFEST, manifest)
                if signature is not None:
                    _add_bytes(tar, SIGNATURE, signature)
                for name, path, entry in members:
                    _add_file(tar, name, path, entry)
            raw.flush()
            os.fsync(raw.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a bundle is meant to be copied around
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    # Fixed owner, mode and time: the same inputs make the same bytes.
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    tar.addfile(_tarinfo(name, len(data)), io.BytesIO(data))


class _HashingReader:
    """A file wrapper that hashes what tarfile reads from it."""

    def __init__(self, f):
        self.f, self.digest = f, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.digest.update(data)
        return data


def _add_file(tar: tarfile.TarFile, name: str, path: Path, entry: dict) -> None:
    with path.open("rb") as f:
        reader = _HashingReader(f)
        try:
            tar.addfile(_tarinfo(name, entry["bytes"]), reader)
        except OSError as exc:  # tarfile's "unexpected end of data": the file shrank
            raise BundleError(f"{path} changed while it was being packaged ({exc})", "package it again") from None
        if reader.digest.hexdigest() != entry["sha256"] or f.read(1):
            raise BundleError(f"{path} changed while it was being packaged", "package it again")


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class Head:
    """The first members of a bundle: manifest bytes and the signature, if any."""

    manifest: bytes
    signature: bytes | None


def _open(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise BundleError(f"bundle {path} does not exist" if not path.exists() else f"bundle {path} is not a file",
                          "pass a file written by `edgekit package`")
    try:
        return tarfile.open(path, mode="r:")
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{path} is not an edgekit bundle (an uncompressed tar): {exc}",
                          "pass a file written by `edgekit package`; decompress it first if it was gzipped") from None


def _members(tar: tarfile.TarFile, path: Path) -> Iterator[tarfile.TarInfo]:
    """Every member, each checked for a safe name and a regular-file type before it is yielded."""
    previous = None
    while True:
        try:
            info = tar.next()
        except (tarfile.TarError, OSError) as exc:
            raise _cut_short(path, previous, exc) from None
        if info is None:
            return
        why = unsafe_path(info.name)
        if why:
            raise BundleError(f"{path}: member {info.name!r} is {why}; refusing to unpack", REPACKAGE)
        if info.issym() or info.islnk():
            raise BundleError(f"{path}: member {info.name!r} is a link (to {info.linkname!r}); refusing to unpack",
                              REPACKAGE)
        if not info.isreg() or info.issparse():
            raise BundleError(f"{path}: member {info.name!r} is not a regular file; refusing to unpack", REPACKAGE)
        previous = info
        yield info


def _cut_short(path: Path, previous: tarfile.TarInfo | None, exc: Exception) -> BundleError:
    """The error for a tar that ends early: the member cut short and how many of its bytes remain."""
    have = path.stat().st_size - previous.offset_data if previous is not None else 0
    if previous is not None and have < previous.size:
        return BundleError(f"{path}: member {previous.name!r} is truncated ({max(have, 0)} of {previous.size} "
                           "bytes)", "copy the bundle again, or " + REPACKAGE)
    after = repr(previous.name) if previous is not None else "the start"
    return BundleError(f"{path} is truncated or corrupt after {after} ({exc})",
                       "copy the bundle again, or " + REPACKAGE)


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, path: Path, limit: int) -> bytes:
    if info.size > limit:
        raise BundleError(f"{path}: {info.name} is {info.size} bytes, more than the {limit} allowed", REPACKAGE)
    try:
        data = tar.extractfile(info).read()
    except (tarfile.TarError, OSError):
        data = b""
    if len(data) != info.size:
        raise BundleError(f"{path}: member {info.name!r} is truncated", "copy the bundle again, or " + REPACKAGE)
    return data


def read_head(path: Path) -> Head:
    """manifest.json (which must come first) and manifest.sig (second, when signed)."""
    with _open(path) as tar:
        members = _members(tar, path)
        first = next(members, None)
        if first is None or first.name != MANIFEST:
            raise BundleError(f"{path} does not start with {MANIFEST}: it is not an edgekit bundle",
                              "pass a file written by `edgekit package`")
        manifest = _read_small(tar, first, path, MAX_MANIFEST_BYTES)
        second = next(members, None)
        if second is None or second.name != SIGNATURE:
            return Head(manifest, None)
        if second.size != SIGNATURE_BYTES:
            raise BundleError(f"{path}: {SIGNATURE} is {second.size} bytes, not an ed25519 signature", REPACKAGE)
        return Head(manifest, _read_small(tar, second, path, SIGNATURE_BYTES))


def _nowhere(member: str) -> Path | None:
    return None


def _no(member: str) -> bool:
    return False


def scan(path: Path, expected: dict[str, dict], dest: Callable[[str], Path | None] = _nowhere,
         hash_also: Callable[[str], bool] = _no) -> int:
    """Check every member of ``path`` against ``expected`` ({member: manifest entry}).

    Members for which ``dest`` returns a path are written there (created, never overwritten) and
    hashed; those for which ``hash_also`` is true are hashed too; of the others only the header
    (name, type, size) is checked, and that the file is long enough to hold them. Returns the
    bytes hashed. Raises BundleError naming the first member that is wrong, missing or cut short.
    """
    seen: set[str] = set()
    hashed = 0
    with _open(path) as tar:
        for index, info in enumerate(_members(tar, path)):
            if (index, info.name) in ((0, MANIFEST), (1, SIGNATURE)):
                continue
            entry = _expected_entry(path, info, expected, seen)
            target = dest(info.name)
            if target is not None or hash_also(info.name):
                _copy_checked(tar, info, entry, path, target)
                hashed += info.size
    missing = sorted(set(expected) - seen)
    if missing:
        more = f" and {len(missing) - 1} more members" if missing[1:] else ""
        raise BundleError(f"{path} lacks {missing[0]}{more}: the bundle is truncated or incomplete",
                          "copy the bundle again, or " + REPACKAGE)
    return hashed


def _expected_entry(path: Path, info: tarfile.TarInfo, expected: dict[str, dict], seen: set[str]) -> dict:
    entry = expected.get(info.name)
    if entry is None:
        raise BundleError(f"{path}: member {info.name!r} is not listed in {MANIFEST}; refusing to unpack", REPACKAGE)
    if info.name in seen:
        raise BundleError(f"{path}: member {info.name!r} appears twice; refusing to unpack", REPACKAGE)
    seen.add(info.name)
    if info.size != entry["bytes"]:
        bigger = "larger" if info.size > entry["bytes"] else "smaller"
        raise BundleError(f"{path}: member {info.name!r} is {info.size} bytes, {bigger} than the "
                          f"{entry['bytes']} {MANIFEST} says; refusing to unpack", REPACKAGE)
    return entry


def _copy_checked(tar: tarfile.TarFile, info: tarfile.TarInfo, entry: dict, path: Path, target: Path | None) -> None:
    """Stream one member into ``target`` (or nowhere), checking its length and sha256."""
    digest, size = hashlib.sha256(), 0
    source = tar.extractfile(info)
    try:
        with contextlib.ExitStack() as stack:
            out = None
            if target is not None:
                target.parent.mkdir(parents=True, exist_ok=True)
                out = stack.enter_context(open(target, "xb"))  # exclusive: never follows or replaces a file
            for chunk in iter(lambda: source.read(CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
                if out is not None:
                    out.write(chunk)
    except FileExistsError:
        raise BundleError(f"{path}: member {info.name!r} would overwrite {target}", REPACKAGE) from None
    except tarfile.ReadError as exc:  # "unexpected end of data"
        raise BundleError(f"{path}: member {info.name!r} is truncated ({exc})",
                          "copy the bundle again, or " + REPACKAGE) from None
    except (tarfile.TarError, OSError) as exc:
        raise BundleError(f"{path}: member {info.name!r} cannot be read or written ({exc})",
                          "copy the bundle again; check the disk") from None
    if size != entry["bytes"]:
        raise BundleError(f"{path}: member {info.name!r} is truncated ({size} of {entry['bytes']} bytes)",
                          "copy the bundle again, or " + REPACKAGE)
    if digest.hexdigest() != entry["sha256"]:
        raise BundleError(f"{path}: member {info.name!r} does not match its sha256 in {MANIFEST}: "
                          "the bundle was modified or damaged", "copy the bundle again, or " + REPACKAGE)
