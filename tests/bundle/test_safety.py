"""Hostile and damaged bundles: refused, naming the member, with nothing written outside the cache
folder and no partial engine left in it."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest

from edgekit.bundle import BundleError, open_bundle, verify_bundle


def _members(bundle: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(info, tar.extractfile(info).read()) for info in tar.getmembers()]


def _write(out: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return out


def _file(name: str, data: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _link(name: str, target: str, kind: bytes) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, b""


def _no_engine_unpacked(cache: Path) -> None:
    found = [p for p in cache.rglob("*")] if cache.exists() else []
    assert not [p for p in found if p.is_file() or p.is_symlink()], found


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("EDGEKIT_CACHE", str(path))
    return path


def _hostile_members(tmp_path: Path, engine: str) -> dict[str, tuple[tarfile.TarInfo, bytes]]:
    return {
        "dotdot": _file("../evil", b"pwned"),
        "deep-dotdot": _file(f"engines/{engine}/../../../../evil", b"pwned"),
        "absolute": _file(str(tmp_path / "abs-evil"), b"pwned"),
        "symlink": _link(f"engines/{engine}/evil-link", str(tmp_path / "link-target"), tarfile.SYMTYPE),
        "hardlink": _link(f"engines/{engine}/evil-hard", "manifest.json", tarfile.LNKTYPE),
        "unlisted": _file(f"engines/{engine}/extra.bin", b"not in the manifest"),
    }


@pytest.mark.parametrize("kind", ["dotdot", "deep-dotdot", "absolute", "symlink", "hardlink", "unlisted"])
@pytest.mark.parametrize("where", ["first", "last"])
def test_hostile_members_are_refused_and_nothing_is_written(builds, bundle, tmp_path, cache, kind, where):
    members = _members(bundle)
    evil = _hostile_members(tmp_path, builds.here_profile)[kind]
    at = 1 if where == "first" else len(members)  # right after the manifest, or after the engine's files
    crafted = _write(tmp_path / "crafted.edgepkg", members[:at] + [evil] + members[at:])
    with tarfile.open(crafted) as tar:
        assert evil[0].name in tar.getnames()  # tarfile kept the hostile name as written
    for attempt in (lambda: verify_bundle(crafted), lambda: open_bundle(crafted)):
        with pytest.raises(BundleError) as info:
            attempt()
        assert repr(evil[0].name) in info.value.message and "refusing" in info.value.message
    written = [p for p in tmp_path.parent.rglob("*evil*")] + [p for p in tmp_path.rglob("link-target")]
    assert written == []
    _no_engine_unpacked(cache)


def test_member_larger_than_the_manifest_says(builds, bundle, tmp_path, cache):
    members = _members(bundle)
    name = f"engines/{builds.here_profile}/model.onnx"
    members = [(_file(name, data + b"\0" * 4096) if info.name == name else (info, data)) for info, data in members]
    crafted = _write(tmp_path / "big.edgepkg", members)
    for attempt in (lambda: verify_bundle(crafted), lambda: open_bundle(crafted)):
        with pytest.raises(BundleError, match="larger than") as info:
            attempt()
        assert repr(name) in info.value.message
    _no_engine_unpacked(cache)


def test_flipped_byte_fails_naming_the_file(builds, bundle, tmp_path, cache):
    name = f"engines/{builds.here_profile}/model.onnx"
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(name).offset_data + 1000
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0x01
    damaged = tmp_path / "flipped.edgepkg"
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256") as info:
        verify_bundle(damaged)
    assert repr(name) in info.value.message
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(damaged)
    _no_engine_unpacked(cache)
    # The other engine's files are not read when it is not the one chosen; its headers still are.
    other = f"engines/{builds.other_profile}/model.onnx"
    with tarfile.open(bundle) as tar:
        offset = tar.getmember(other).offset_data + 1000
    data = bytearray(bundle.read_bytes())
    data[offset] ^= 0x01
    damaged.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=repr(other)):
        verify_bundle(damaged)
    assert open_bundle(damaged).name == builds.here_profile


def test_truncated_bundle_names_the_member(builds, bundle, tmp_path, cache):
    name = f"engines/{builds.here_profile}/model.onnx"
    with tarfile.open(bundle) as tar:
        cut = tar.getmember(name).offset_data + 100
    truncated = tmp_path / "cut.edgepkg"
    truncated.write_bytes(bundle.read_bytes()[:cut])
    for attempt in (lambda: verify_bundle(truncated), lambda: open_bundle(truncated)):
        with pytest.raises(BundleError, match="truncated") as info:
            attempt()
        assert repr(name) in info.value.message
    _no_engine_unpacked(cache)
    truncated.write_bytes(bundle.read_bytes()[:512 * 3])  # the manifest, cut short
    with pytest.raises(BundleError):
        verify_bundle(truncated)


def test_not_a_bundle(tmp_path):
    for content, expected in ((b"hello", "not an edgekit bundle"), (None, "does not exist")):
        path = tmp_path / "x.edgepkg"
        if content is not None:
            path.write_bytes(content)
        else:
            path.unlink()
        with pytest.raises(BundleError, match=expected):
            verify_bundle(path)
    no_manifest = _write(tmp_path / "plain.edgepkg", [_file("model.onnx", b"x")])
    with pytest.raises(BundleError, match="does not start with manifest.json"):
        verify_bundle(no_manifest)


def test_tampered_manifest_is_refused(bundle, tmp_path):
    import json

    members = _members(bundle)
    manifest = json.loads(members[0][1])
    manifest["engines"][0]["files"][0]["path"] = "../escape"
    crafted = _write(tmp_path / "m.edgepkg", [_file("manifest.json", json.dumps(manifest).encode())] + members[1:])
    with pytest.raises(BundleError, match="'..'"):
        verify_bundle(crafted)
    manifest["schema_version"] = 99
    crafted = _write(tmp_path / "n.edgepkg", [_file("manifest.json", json.dumps(manifest).encode())] + members[1:])
    with pytest.raises(BundleError, match="schema_version 99"):
        verify_bundle(crafted)
