"""The unpack cache: one checked folder per (manifest, engine), served only to bundle files
whose members were checked against it.

    $EDGEKIT_CACHE/bundles/<manifest sha256>/<engine id>/        the engine's files, as unpacked
    $EDGEKIT_CACHE/bundles/<manifest sha256>/.<engine id>.json   the stat of every file in that folder
                                                                 when it was checked, and the bundle
                                                                 files (device, inode, size, mtime,
                                                                 ctime) whose engine members matched it

The folder is keyed by the manifest, which lists every member's sha256, so its content is right
for any bundle with that manifest whose members match. A bundle file is trusted to match only
once its engine's members were hashed: any other file (a damaged copy, the same path rewritten,
which gets a new ctime) is hashed again before the folder serves it, and fails if it differs.
A folder whose files changed since they were checked is unpacked again. One process at a time
checks or fills an entry (an advisory lock), so none removes a folder that another is using.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgekit.bundle.archive import scan
from edgekit.bundle.manifest import REPACKAGE, BundleError, engine_members

KEEP_FILES = 16  # bundle files remembered per entry; an older one is simply hashed again
RACY_NS = 2_000_000_000  # file times tick coarsely: a file changed this recently may change again unseen


def cached_engine(bundle: Path, members: dict[str, dict], engine: dict[str, Any], root: Path) -> Path:
    """The checked folder of ``engine`` under ``root`` (``bundles/<manifest sha256>``): reused when
    it is unchanged and ``bundle`` is a file already checked against it, else ``bundle``'s engine
    members are hashed (and, if the folder is missing or changed, unpacked) first."""
    folder, record = root / engine["id"], root / f".{engine['id']}.json"
    wanted = engine_members(engine)
    file_id = _file_id(bundle)  # taken before reading: a change while we read gives the file a new id
    root.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(root / f".{engine['id']}.lock"):
            state = _load(record)
            if state is not None and state["files"] == _stat_tree(folder):
                if file_id not in state["bundles"]:
                    scan(bundle, members, hash_also=wanted.__contains__)  # another file: its bytes must match too
                    _save(record, {**state, "bundles": _remember(state["bundles"], file_id, bundle)})
                return folder
            record.unlink(missing_ok=True)
            if folder.is_symlink():  # never followed: only the link goes
                folder.unlink()
            shutil.rmtree(folder, ignore_errors=True)  # edgekit's own cache entry, changed since it was checked
            _unpack(bundle, members, wanted, folder)
            _save(record, {"files": _stat_tree(folder), "bundles": _remember([], file_id, bundle)})
            return folder
    except BaseException:
        _remove_if_unused(root)  # a failed first unpack leaves no folder behind
        raise


def _unpack(bundle: Path, members: dict[str, dict], wanted: dict[str, str], folder: Path) -> None:
    """Write the engine's members into a temporary sibling of ``folder``; it is renamed once all check out."""
    from edgekit._files import atomic_dir

    with atomic_dir(folder, force=False) as tmp:
        tmp = tmp.resolve()

        def dest(member: str) -> Path | None:
            if member not in wanted:
                return None
            target = tmp / wanted[member]
            if not target.parent.resolve().is_relative_to(tmp):  # names were checked; this guards the folder
                raise BundleError(f"{bundle}: member {member!r} would be written outside {tmp}", REPACKAGE)
            return target

        scan(bundle, members, dest)


def _file_id(path: Path) -> str:
    st = path.stat()
    return f"{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"


def _remember(known: list[str], file_id: str, bundle: Path) -> list[str]:
    """``known`` plus ``file_id`` when the file, just checked, still has that id and did not change in
    the last ``RACY_NS`` (a rewrite within one tick of the file clock could keep the id: such a
    file is simply checked again next time)."""
    st = bundle.stat()
    if _file_id(bundle) != file_id or time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < RACY_NS:
        return known
    return [*known[1 - KEEP_FILES:], file_id]


def _stat_tree(folder: Path) -> dict[str, list[int]]:
    """{path: [mode, size, inode, mtime, ctime]} of everything under ``folder``; {} when it is not a folder."""
    if folder.is_symlink() or not folder.is_dir():
        return {}
    tree = {}
    for item in sorted(folder.rglob("*")):
        st = item.lstat()
        tree[item.relative_to(folder).as_posix()] = [st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns,
                                                     st.st_ctime_ns]
    return tree


def _load(record: Path) -> dict[str, Any] | None:
    try:
        state = json.loads(record.read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(state, dict) and isinstance(state.get("files"), dict) and isinstance(state.get("bundles"), list)
    return state if ok else None


def _save(record: Path, state: dict[str, Any]) -> None:
    tmp = record.with_name(f"{record.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state) + "\n")
    os.replace(tmp, record)  # readers see the old record or the new one, never half of one


@contextlib.contextmanager
def _locked(lock: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``lock`` (created if needed) for the block."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; two first opens at once may unpack the same engine twice
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield  # closing the file releases the lock


def _remove_if_unused(root: Path) -> None:
    """Remove ``root`` when it holds nothing but lock files (no engine folder, no record)."""
    try:
        names = os.listdir(root)
        if all(name.endswith(".lock") for name in names):
            for name in names:
                (root / name).unlink(missing_ok=True)
            root.rmdir()
    except OSError:
        pass  # another process is using it
