"""The bundle manifest: what each engine is, what hardware it needs, and every member's sha256 and size.

    {"schema_version": 1, "format": "edgekit-bundle", "created_by": {"edgekit": "0.1.0"},
     "name": "Qwen3-0.6B",                        the model's name (its source's last part), as served
     "model": {...ModelSpec, without "source"...},
     "shared": [FILE, ...],                       stored as shared/<path>
     "engines": [{"id", "kind", "profile", "runtime", "precision", "quantization", "export_target",
                  "dtype", "model_file", "requirements", "edgekit_version", ["quality"], ["bench"], ...,
                  "files": [FILE, ...],           stored as engines/<id>/<path>
                  "shared": [path, ...]}, ...]}   shared files this engine's folder holds
    FILE = {"path": "model.onnx", "sha256": "<64 hex>", "bytes": 123}

Made from build folders (``edgekit build``) and export folders (a portable ORT-CPU engine that
needs only a CPU). Plain data: nothing here imports torch, transformers or onnx.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePath
from typing import Any

from edgekit._files import sha256_file  # noqa: F401  (used below, re-exported)
from edgekit.errors import EdgekitError
from edgekit.types import EXPORT_RUNTIME, ExportedGraph, read_sidecar

SCHEMA_VERSION = 1
FORMAT = "edgekit-bundle"
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
SHARED_DIR = "shared"
ENGINES_DIR = "engines"
ENGINE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256 = re.compile(r"^[0-9a-f]{64}$")
# Build-sidecar figures carried into the manifest when present (written by later stages).
FIGURES = ("quality", "bench")
REPACKAGE = "package it again with `edgekit package`"


class BundleError(EdgekitError):
    """A bundle cannot be written, read, trusted or run here."""


def unsafe_path(name: str) -> str | None:
    """Why ``name`` may not be a member or manifest path (absolute, ``..``, ...), or None."""
    if not name:
        return "an empty path"
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        return "an absolute path"
    if "\\" in name or "\x00" in name:
        return "a path with a backslash or NUL"
    parts = name.split("/")
    if ".." in parts:
        return "a path with '..'"
    if any(part in ("", ".") for part in parts):
        return "a path that is not normalized (empty or '.' component)"
    return None


# ---------------------------------------------------------------- making a manifest from folders


def model_name(source: Any) -> str | None:
    """The name clients know a model by, from the source it was exported from: the last part of
    a hub id or folder (``Qwen/Qwen3-0.6B`` -> ``Qwen3-0.6B``), or a preset's name."""
    if not isinstance(source, str):
        return None
    name = PurePath(os.path.normpath(source)).name
    return name if name not in ("", ".", "..") else None


class Source:
    """One folder to package: its engine entry (without id and files) and the files to store."""

    def __init__(self, folder: Path):
        self.folder = folder
        data = read_sidecar(folder)
        graph = ExportedGraph.load(folder)  # checks the sidecar and that the model file is there
        export = data["export"] if data.get("kind") == "build" else data
        self.model = {k: v for k, v in export["model"].items() if k != "source"}
        self.name = model_name(export["model"].get("source"))
        self.shared = sorted(name for name in graph.tokenizer_files if (folder / name).is_file())
        self.engine = _build_entry(data) if graph.kind == "build" else _export_entry(export)
        self.engine.update({k: v for source in (data, data.get("build") or {}) for k, v in source.items()
                            if k in FIGURES and v is not None})
        self.files = _engine_files(folder, set(self.shared))


def _build_entry(data: dict[str, Any]) -> dict[str, Any]:
    build, export = data["build"], data["export"]
    entry = {
        "kind": "build", "profile": build["profile"], "runtime": build["runtime"],
        "precision": build["precision"], "quantization": build.get("quantization", "none"),
        "export_target": export["target"], "dtype": export["dtype"], "model_file": build["model_file"],
        "requirements": build["requirements"],
        "edgekit_version": build.get("edgekit_version") or export["versions"].get("edgekit"),
        "onnxruntime_version": build.get("onnxruntime_version"), "tensorrt_version": build.get("tensorrt_version"),
        "source_export": build.get("source_export"),
        "refit_files": build.get("refit_files"),  # a weight-stripped plan: the weights it refits from
    }
    return {k: v for k, v in entry.items() if v is not None}


def _export_entry(export: dict[str, Any]) -> dict[str, Any]:
    # An export runs as it is on ONNX Runtime's CPU provider, on any CPU.
    return {
        "kind": "export", "profile": None, "runtime": EXPORT_RUNTIME, "precision": export["dtype"],
        "quantization": "none", "export_target": export["target"], "dtype": export["dtype"],
        "model_file": export["model_file"], "requirements": {"device": "cpu"},
        "edgekit_version": export["versions"].get("edgekit"),
    }


def _engine_files(folder: Path, shared: set[str]) -> list[tuple[str, Path]]:
    """(path relative to the folder, file) for every regular file but the shared ones; refuses links."""
    files = []
    for item in sorted(folder.rglob("*")):
        rel = item.relative_to(folder).as_posix()
        if item.is_symlink():
            raise BundleError(f"{item} is a link; bundles hold regular files only",
                              "replace the link with the file it points to")
        if item.is_file() and rel not in shared:
            files.append((rel, item))
    return files


def make_manifest(sources: list[Source], version: str) -> tuple[dict[str, Any], list[tuple[str, Path, dict]]]:
    """The manifest for ``sources``, and (member, file, entry) for every member to store, in order."""
    _check_same_model(sources)
    shared, members = _shared_entries(sources)
    engines, ids = [], set()
    for source in sources:
        engine_id = _unique_id(source.engine["profile"] or f"export-{source.engine['export_target']}", ids)
        files = []
        for rel, path in source.files:
            entry = {"path": rel, "sha256": sha256_file(path), "bytes": path.stat().st_size}
            files.append(entry)
            members.append((f"{ENGINES_DIR}/{engine_id}/{rel}", path, entry))
        engines.append({"id": engine_id, **source.engine, "files": files, "shared": source.shared})
    manifest = {"schema_version": SCHEMA_VERSION, "format": FORMAT, "created_by": {"edgekit": version},
                **({"name": sources[0].name} if sources[0].name else {}),
                "model": sources[0].model, "shared": shared, "engines": engines}
    return manifest, members


def _check_same_model(sources: list[Source]) -> None:
    first = sources[0]
    for other in sources[1:]:
        if other.model != first.model:
            raise BundleError(f"{other.folder} holds a different model than {first.folder}",
                              "a bundle holds builds of one model; package each model on its own")


def _shared_entries(sources: list[Source]) -> tuple[list[dict], list[tuple[str, Path, dict]]]:
    """Tokenizer, chat template and generation defaults, stored once; engines must agree on them."""
    entries: dict[str, tuple[dict, Path]] = {}
    for source in sources:
        for name in source.shared:
            path = source.folder / name
            entry = {"path": name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
            seen = entries.setdefault(name, (entry, path))
            if seen[0]["sha256"] != entry["sha256"]:
                raise BundleError(f"{name} differs between {seen[1].parent} and {source.folder}",
                                  "package builds made from the same export")
    ordered = [entries[name] for name in sorted(entries)]
    return [e for e, _ in ordered], [(f"{SHARED_DIR}/{e['path']}", p, e) for e, p in ordered]


def _unique_id(base: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).lstrip(".-_") or "engine"
    engine_id, n = base, 1
    while engine_id in taken:
        n += 1
        engine_id = f"{base}-{n}"
    taken.add(engine_id)
    return engine_id


# ---------------------------------------------------------------- checking a manifest read from a bundle


def check_manifest(data: Any, bundle: Path) -> dict[str, dict]:
    """Validate a manifest read from ``bundle``; returns {member name: file entry} for every member."""
    def fail(what: str) -> BundleError:
        return BundleError(f"{bundle}: {MANIFEST} {what}", REPACKAGE)

    if not isinstance(data, dict):
        raise fail("is not a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{bundle}: {MANIFEST} has schema_version {version!r}; this edgekit reads {SCHEMA_VERSION}",
                          "use the edgekit version that made it (created_by), or package it again with this one")
    if data.get("format") != FORMAT:
        raise fail(f"has format {data.get('format')!r}, not {FORMAT!r}")
    members = {f"{SHARED_DIR}/{e['path']}": e for e in _file_list(data.get("shared"), "shared", fail)}
    engines = data.get("engines")
    if not isinstance(engines, list) or not engines:
        raise fail("lists no engines")
    for i, engine in enumerate(engines):
        members.update(_check_engine(engine, f"engines[{i}]", set(e["path"] for e in data["shared"]), fail))
    if len({e["id"] for e in engines}) != len(engines):
        raise fail("gives two engines the same id")
    return members


def _check_engine(engine: Any, where: str, shared: set[str], fail) -> dict[str, dict]:
    if not isinstance(engine, dict):
        raise fail(f"{where} is not an object")
    if not isinstance(engine.get("id"), str) or not ENGINE_ID.match(engine["id"]):
        raise fail(f"{where}.id {engine.get('id')!r} is not a plain name")
    for key, kind in (("runtime", str), ("requirements", dict), ("model_file", str)):
        if not isinstance(engine.get(key), kind):
            raise fail(f"{where}.{key} is missing or not a {kind.__name__}")
    files = _file_list(engine.get("files"), f"{where}.files", fail)
    uses = engine.get("shared")
    if not isinstance(uses, list) or not all(isinstance(u, str) for u in uses) or not set(uses) <= shared:
        raise fail(f"{where}.shared names files the manifest does not list")
    paths = [e["path"] for e in files]
    if set(paths) & set(uses) or engine["model_file"] not in paths:
        raise fail(f"{where}.files clash with its shared files, or lack its model_file")
    return {f"{ENGINES_DIR}/{engine['id']}/{e['path']}": e for e in files}


def _file_list(files: Any, where: str, fail) -> list[dict]:
    if not isinstance(files, list):
        raise fail(f"{where} is not a list")
    paths = set()
    for i, entry in enumerate(files):
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            raise fail(f"{where}[{i}] has no path")
        why = unsafe_path(entry["path"])
        if why:
            raise fail(f"{where}[{i}].path {entry['path']!r} is {why}")
        if not isinstance(entry.get("sha256"), str) or not SHA256.match(entry["sha256"]):
            raise fail(f"{where}[{i}].sha256 is not a sha256")
        size = entry.get("bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise fail(f"{where}[{i}].bytes is not a size")
        if entry["path"] in paths:
            raise fail(f"{where} lists {entry['path']!r} twice")
        paths.add(entry["path"])
    return files


def engine_members(engine: dict[str, Any]) -> dict[str, str]:
    """{member name: path inside the engine's folder} for an engine and the shared files it uses."""
    own = {f"{ENGINES_DIR}/{engine['id']}/{e['path']}": e["path"] for e in engine["files"]}
    return {**own, **{f"{SHARED_DIR}/{name}": name for name in engine["shared"]}}


def engine_bytes(engine: dict[str, Any], manifest: dict[str, Any]) -> int:
    """Bytes of an engine's folder once unpacked (its files plus the shared ones it uses)."""
    shared = {e["path"]: e["bytes"] for e in manifest["shared"]}
    return sum(e["bytes"] for e in engine["files"]) + sum(shared[name] for name in engine["shared"])
