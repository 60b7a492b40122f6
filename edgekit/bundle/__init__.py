"""Bundles: one ``.edgepkg`` file that carries a model's engines to devices.

    build folders / export folders ─pack_bundle→ FILE.edgepkg (manifest.json first, [manifest.sig],
                                                 shared/ tokenizer files once, engines/<id>/...)
    FILE.edgepkg ─verify_bundle→ every member's sha256 and size, the schema, [the ed25519 signature]
    FILE.edgepkg ─open_bundle→ the engine that fits this machine, unpacked and checked into the cache
                              (``$EDGEKIT_CACHE/bundles/<manifest sha256>/<engine id>``, see cache.py)

Device side: nothing here imports torch, transformers or onnx; ``edgekit-llm[cpu]`` is enough.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.bundle.archive import Head, read_head, scan, write_bundle
from edgekit.bundle.manifest import MANIFEST, REPACKAGE, BundleError, Source, check_manifest, make_manifest
from edgekit.bundle.signing import check_signature, keygen, sign
from edgekit.errors import did_you_mean

__all__ = ["BundleError", "BundleInfo", "NoFittingEngine", "choose_engine", "inspect_bundle", "keygen",
           "open_bundle", "pack_bundle", "verify_bundle"]

SUFFIX = ".edgepkg"


class NoFittingEngine(BundleError):
    """No engine of the bundle can run on this machine."""


@dataclass(frozen=True)
class BundleInfo:
    """A bundle as read (or written): its manifest, size, manifest hash and signature state."""

    path: Path
    bytes: int
    manifest_sha256: str
    signature: str  # "unsigned", "signed (not checked)", "signed with KEY", "signature verified with KEY"
    manifest: dict[str, Any]

    @property
    def engines(self) -> list[dict[str, Any]]:
        return self.manifest["engines"]

    @property
    def name(self) -> str:
        """The model's name, as served: the manifest's (its source's), else the file's stem."""
        name = self.manifest.get("name")
        return name if isinstance(name, str) and name.strip() else self.path.stem

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "bytes": self.bytes, "manifest_sha256": self.manifest_sha256,
                "signature": self.signature, "manifest": self.manifest}


def pack_bundle(paths: list[str | Path], out: str | Path, sign_with: str | Path | None = None,
                force: bool = False) -> BundleInfo:
    """Package build and/or export folders of one model into ``out`` (``*.edgepkg``), signed when
    ``sign_with`` names a private key. Atomic: a failure leaves nothing at ``out``."""
    from edgekit import __version__
    from edgekit._files import check_output

    out = Path(out)
    if out.suffix != SUFFIX:
        raise BundleError(f"output {out} does not end in {SUFFIX}", f"name it {out.name}{SUFFIX}: "
                          "`edgekit run` recognizes bundles by that suffix")
    check_output(out, force, "bundle", inputs=paths)
    folders = _distinct_folders(paths)
    manifest, members = make_manifest([Source(folder) for folder in folders], __version__)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    signature = sign(data, sign_with) if sign_with is not None else None  # a bad key fails before writing
    write_bundle(out, data, signature, members)
    state = f"signed with {sign_with}" if signature else "unsigned"
    return BundleInfo(out, out.stat().st_size, hashlib.sha256(data).hexdigest(), state, manifest)


def _distinct_folders(paths: list[str | Path]) -> list[Path]:
    if not paths:
        raise BundleError("nothing to package", "pass build folders (edgekit build) or export folders")
    folders, seen = [], set()
    for path in map(Path, paths):
        if path.resolve() in seen:
            raise BundleError(f"{path} is given twice", "pass each folder once")
        seen.add(path.resolve())
        folders.append(path)
    return folders


def _read(path: Path) -> tuple[Head, dict[str, Any], dict[str, dict]]:
    """The head, the checked manifest and {member: entry} of the bundle at ``path``."""
    head = read_head(path)
    try:
        manifest = json.loads(head.manifest)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: {MANIFEST} is not valid JSON ({exc})", REPACKAGE) from None
    return head, manifest, check_manifest(manifest, path)


def _info(path: Path, head: Head, manifest: dict[str, Any], signature: str) -> BundleInfo:
    return BundleInfo(path, path.stat().st_size, hashlib.sha256(head.manifest).hexdigest(), signature, manifest)


def _signature_state(path: Path, head: Head, pubkey: str | Path | None) -> str:
    if pubkey is not None:
        check_signature(head.manifest, head.signature, pubkey, path)
        return f"signature verified with {pubkey}"
    return "signed (not checked)" if head.signature is not None else "unsigned"


def inspect_bundle(path: str | Path) -> BundleInfo:
    """Read a bundle's manifest (checked against the schema) and every member's header: a
    member missing, unlisted, of the wrong size or cut short fails. No member is hashed."""
    path = Path(path)
    head, manifest, members = _read(path)
    scan(path, members)
    return _info(path, head, manifest, _signature_state(path, head, None))


def verify_bundle(path: str | Path, pubkey: str | Path | None = None) -> BundleInfo:
    """Check the schema, every member's name, type, size and sha256, and with ``pubkey`` the
    ed25519 signature over the manifest; raises BundleError naming what is wrong."""
    path = Path(path)
    head, manifest, members = _read(path)
    state = _signature_state(path, head, pubkey)
    scan(path, members, hash_also=lambda member: True)
    return _info(path, head, manifest, state)


def open_bundle(path: str | Path, profile: str | None = None, pubkey: str | Path | None = None) -> Path:
    """Unpack the engine of ``path`` that fits this machine (or the one for ``profile``) into the
    cache, checking every file's sha256 on the way, and return its folder (loadable by
    ``edgekit.runtimes.registry.open_engine``). Later calls with the same, unchanged file
    reuse the checked folder; any other file is checked again (see ``edgekit.bundle.cache``)."""
    from edgekit.bundle.cache import cached_engine
    from edgekit._files import cache_dir

    path = Path(path)
    head, manifest, members = _read(path)
    _signature_state(path, head, pubkey)
    engine = choose_engine(manifest, path, profile)
    root = cache_dir() / "bundles" / hashlib.sha256(head.manifest).hexdigest()
    if engine.get("refit_files"):  # its weights are the bundle's export: unpacked beside it, where it refits from
        cached_engine(path, members, _weights_engine(manifest, engine, path), root)
    return cached_engine(path, members, engine, root)


def _weights_engine(manifest: dict[str, Any], engine: dict[str, Any], bundle: Path) -> dict[str, Any]:
    """The engine of the bundle whose files are the ones a weight-stripped plan refits from."""
    def holds(candidate: dict[str, Any]) -> bool:
        files = {e["path"]: e["sha256"] for e in candidate["files"]}
        return all(files.get(name) == want["sha256"] for name, want in engine["refit_files"].items())

    found = next((e for e in manifest["engines"] if e is not engine and holds(e)), None)
    if found is None:
        raise BundleError(f"{bundle}: engine {engine['id']} is a plan without its weights, and no engine in the "
                          "bundle holds them", "package the export it was built from into the same bundle")
    return found


def choose_engine(manifest: dict[str, Any], bundle: Path, profile: str | None = None,
                  machine: Any = None) -> dict[str, Any]:
    """The engine to run on ``machine`` (default: this one): one whose requirements it meets,
    preferring the machine's own profile, then builds over exports, then GPUs over CPUs.
    ``profile`` (a profile name or an engine id) narrows the choice to that engine."""
    from edgekit.doctor import detect, fitting_profile

    machine = machine if machine is not None else detect()
    here = fitting_profile(machine)
    engines = manifest["engines"] if profile is None else _engines_for(manifest, bundle, profile)
    missing = {e["id"]: engine_missing(e, machine) for e in engines}
    fits = [e for e in engines if not missing[e["id"]]]
    if not fits:
        raise _refusal(bundle, manifest, engines, missing, here)

    def rank(engine: dict[str, Any]) -> tuple:
        return (here is None or engine.get("profile") != here, engine.get("kind") == "export",
                engine["requirements"].get("device", "cpu") == "cpu")

    return min(fits, key=rank)  # min keeps manifest order among equals


def _engines_for(manifest: dict[str, Any], bundle: Path, profile: str) -> list[dict[str, Any]]:
    engines = [e for e in manifest["engines"] if profile in (e["id"], e.get("profile"))]
    if not engines:
        names = [e.get("profile") or e["id"] for e in manifest["engines"]]
        raise BundleError(f"{bundle} has no engine for profile {profile!r}.{did_you_mean(profile, names)}",
                          f"its engines: {', '.join(names)} (edgekit inspect {bundle})")
    return engines


def engine_missing(engine: dict[str, Any], machine: Any) -> list[str]:
    """What ``machine`` lacks to run ``engine``, one sentence each; empty when it fits."""
    from edgekit.runtimes.registry import engine_missing as missing

    return missing(engine["runtime"], engine["requirements"], machine)


def _refusal(bundle: Path, manifest: dict[str, Any], engines: list[dict], missing: dict[str, list[str]],
             here: str | None) -> NoFittingEngine:
    what = "; ".join(f"{e['id']} (profile {e.get('profile') or 'none: an export'}, {e['runtime']}): "
                     + ", ".join(missing[e["id"]]) for e in engines)
    sources = [e["source_export"].get("path") for e in manifest["engines"] if isinstance(e.get("source_export"), dict)]
    sources = [s for s in sources if isinstance(s, str)]
    export, target = (sources[0] if sources else "EXPORT_DIR"), here or "PROFILE"
    return NoFittingEngine(
        f"{bundle} has no engine for this machine (profile {here or 'none fits: see edgekit doctor'}): {what}",
        f"build one here and package it: `edgekit build {export} --profile {target} -o build-{target}`, "
        f"then `edgekit package build-{target} OTHER_BUILDS... -o {bundle.name}`",
    )
