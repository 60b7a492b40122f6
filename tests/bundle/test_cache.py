"""What a device sees of a damaged bundle: ``inspect`` fails on a truncated one, a damaged file
never runs from the cache an intact one filled, and a failed unpack leaves no cache folder."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pytest

from edgekit.bundle import open_bundle
from edgekit.bundle.manifest import sha256_file
from tests.bundle.test_bundle import edgekit


def _member(bundle: Path, name: str) -> tarfile.TarInfo:
    with tarfile.open(bundle) as tar:
        return tar.getmember(name)


def _flipped(bundle: Path, name: str) -> bytes:
    """The bytes of ``bundle`` with one byte of member ``name`` flipped."""
    data = bytearray(bundle.read_bytes())
    data[_member(bundle, name).offset_data + 1000] ^= 0x01
    return bytes(data)


def _old(path: Path) -> Path:
    """Date ``path`` back a minute, as a bundle copied onto a device earlier would be."""
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns - 60 * 10**9))
    return path


def _run(bundle: Path, cache: Path):
    return edgekit("run", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json",
                   env={"EDGEKIT_CACHE": str(cache)})


@pytest.fixture
def model(builds):
    return f"engines/{builds.here_profile}/model.onnx"


def test_inspect_of_a_truncated_bundle_fails_naming_the_member(bundle, model, tmp_path):
    info = _member(bundle, model)
    cut = tmp_path / "cut.edgepkg"
    cut.write_bytes(bundle.read_bytes()[:info.offset_data + 100])
    for args in ((), ("--json",)):
        shown = edgekit("inspect", str(cut), *args)
        assert shown.returncode == 1, shown.stdout
        assert f"error: {cut}: member {model!r} is truncated (100 of {info.size} bytes)" in shown.stderr
        assert "hint: copy the bundle again" in shown.stderr and "Traceback" not in shown.stderr
    # Cut at a member's end: the tar reads as complete, but the manifest's other members are missing.
    cut.write_bytes(bundle.read_bytes()[:info.offset_data + info.size + (-info.size % 512)])
    shown = edgekit("inspect", str(cut))
    assert shown.returncode == 1 and f"error: {cut} lacks " in shown.stderr and "truncated" in shown.stderr
    assert edgekit("inspect", str(bundle)).returncode == 0


def test_a_damaged_file_never_runs_from_the_cache(builds, bundle, model, tmp_path):
    cache = tmp_path / "cache"
    good = _old(Path(shutil.copy(bundle, tmp_path / "model.edgepkg")))
    time.sleep(2.1)  # a file changed in the last 2 s is never remembered as checked: let this one be
    first = _run(good, cache)
    assert first.returncode == 0, first.stderr
    damaged = tmp_path / "copy.edgepkg"
    damaged.write_bytes(_flipped(bundle, model))
    rewritten = _flipped(bundle, model)
    for attempt in ("another file", "the same path, rewritten"):
        if attempt != "another file":
            good.write_bytes(rewritten)
            _old(good)  # the same size and an old mtime: only the ctime and the bytes tell
        ran = _run(damaged if attempt == "another file" else good, cache)
        assert ran.returncode == 1, (attempt, ran.stdout)
        assert f"member {model!r} does not match its sha256" in ran.stderr and "hint:" in ran.stderr, attempt
    good.write_bytes(bundle.read_bytes())
    again = _run(good, cache)
    assert again.returncode == 0 and json.loads(again.stdout)["token_ids"] == json.loads(first.stdout)["token_ids"]


def test_the_cache_is_reused_for_an_intact_copy_and_refilled_when_changed(builds, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    folder = open_bundle(_old(Path(shutil.copy(bundle, tmp_path / "a.edgepkg"))))
    data = folder / "model.onnx.data"
    inode = data.stat().st_ino
    assert open_bundle(_old(Path(shutil.copy(bundle, tmp_path / "b.edgepkg")))) == folder
    assert data.stat().st_ino == inode  # checked against the copy, not unpacked again
    expected = sha256_file(data)
    with data.open("r+b") as f:  # the cache itself damaged: same size, other bytes
        first = f.read(1)[0]
        f.seek(0)
        f.write(bytes([first ^ 0xFF]))
    assert sha256_file(data) != expected
    assert open_bundle(tmp_path / "a.edgepkg") == folder
    assert sha256_file(data) == expected  # unpacked again


def test_a_failed_unpack_leaves_no_cache_folder(bundle, model, tmp_path):
    cache = tmp_path / "cache"
    damaged = tmp_path / "damaged.edgepkg"
    damaged.write_bytes(_flipped(bundle, model))
    ran = _run(damaged, cache)
    assert ran.returncode == 1 and "sha256" in ran.stderr
    left = sorted(str(p.relative_to(cache)) for p in (cache / "bundles").rglob("*")) if cache.exists() else []
    assert left == []
