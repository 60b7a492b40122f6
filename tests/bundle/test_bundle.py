"""Bundles end to end: package two builds, inspect, verify, pick the engine that fits, run it."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from edgekit.bundle import BundleError, NoFittingEngine, inspect_bundle, keygen, open_bundle, pack_bundle, verify_bundle
from edgekit.bundle.manifest import sha256_file

PROMPT = [1, 2, 3]


def _tokens(folder: Path, steps: int = 8) -> list[int]:
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine

    session = open_engine(folder)
    return generate(session, PROMPT, steps, eos_ids=()).token_ids


def edgekit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                          capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300)


def test_round_trip_picks_the_fitting_engine_and_runs_it(builds, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    info = inspect_bundle(bundle)
    manifest = info.manifest
    assert manifest["schema_version"] == 1 and manifest["format"] == "edgekit-bundle"
    assert [e["id"] for e in manifest["engines"]] == [builds.here_profile, builds.other_profile]
    here = manifest["engines"][0]
    assert here["runtime"] == "ort-cpu" and here["profile"] == builds.here_profile and here["kind"] == "build"
    assert here["precision"] == "fp32" and here["quantization"] == "none" and here["edgekit_version"]
    assert here["requirements"] == json.loads((builds.here / "edgekit.json").read_text())["build"]["requirements"]
    model = next(f for f in here["files"] if f["path"] == "model.onnx")
    assert model == {"path": "model.onnx", "sha256": sha256_file(builds.here / "model.onnx"),
                     "bytes": (builds.here / "model.onnx").stat().st_size}
    # Tokenizer and generation defaults are stored once, under shared/, and listed by each engine.
    assert "tokenizer.json" in [f["path"] for f in manifest["shared"]]
    assert all("tokenizer.json" in e["shared"] and "tokenizer.json" not in [f["path"] for f in e["files"]]
               for e in manifest["engines"])
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
    assert names[0] == "manifest.json" and names.count("shared/tokenizer.json") == 1
    assert info.signature == "unsigned"
    assert verify_bundle(bundle).signature == "unsigned"

    folder = open_bundle(bundle)
    assert folder.parent.name == info.manifest_sha256 and folder.name == builds.here_profile
    assert folder.is_relative_to(tmp_path / "cache")
    assert (folder / "tokenizer.json").is_file() and (folder / "edgekit.json").is_file()
    assert _tokens(folder) == _tokens(builds.here)
    assert open_bundle(bundle) == folder  # unpacked once, then reused


def test_profile_forces_an_engine_and_unknown_ones_are_named(builds, bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(NoFittingEngine) as info:
        open_bundle(bundle, profile=builds.other_profile)
    assert f"{builds.other_profile} (profile" in info.value.message
    assert f"{builds.here_profile} (profile" not in info.value.message  # only the forced engine is judged
    with pytest.raises(BundleError) as info:
        open_bundle(bundle, profile=builds.here_profile[:-1])
    assert "Did you mean" in info.value.message and builds.other_profile in info.value.hint
    assert not (tmp_path / "cache" / "bundles").exists() or not any((tmp_path / "cache" / "bundles").rglob("*.onnx"))


def test_only_other_hardware_is_refused_with_the_rebuild_hint(builds, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    other = pack_bundle([builds.other], tmp_path / "other.edgepkg")
    with pytest.raises(NoFittingEngine) as info:
        open_bundle(other.path)
    message, hint = info.value.message, info.value.hint
    assert builds.other_profile in message and "CPU flags" in message and builds.here_profile in message
    assert f"edgekit build {builds.export.resolve()} --profile {builds.here_profile} -o" in hint
    assert "edgekit package" in hint
    assert not (tmp_path / "cache" / "bundles").exists()


def test_export_folder_is_a_portable_cpu_engine(builds, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    info = pack_bundle([builds.export, builds.other], tmp_path / "mixed.edgepkg")
    export = info.engines[0]
    assert export["kind"] == "export" and export["runtime"] == "ort-cpu" and export["profile"] is None
    assert export["requirements"] == {"device": "cpu"} and export["id"] == "export-ort"
    folder = open_bundle(info.path)
    assert folder.name == "export-ort"
    assert _tokens(folder) == _tokens(builds.export)


def test_build_figures_are_carried(builds, tmp_path):
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(builds.here, copy)
    sidecar = json.loads((copy / "edgekit.json").read_text())
    sidecar["build"]["quality"] = {"greedy_match": 32, "max_abs_logit_diff": 1e-5}
    sidecar["bench"] = {"decode_tokens_per_s": 123.0}
    (copy / "edgekit.json").write_text(json.dumps(sidecar))
    engine = pack_bundle([copy], tmp_path / "f.edgepkg").engines[0]
    assert engine["quality"]["greedy_match"] == 32 and engine["bench"] == {"decode_tokens_per_s": 123.0}
    assert "quality" not in inspect_bundle(tmp_path / "f.edgepkg").manifest["engines"][0]["requirements"]


def test_signature_right_key_passes_wrong_key_fails(builds, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEKIT_CACHE", str(tmp_path / "cache"))
    key, pub = keygen(tmp_path / "keys" / "release.pem")
    assert pub == tmp_path / "keys" / "release.pem.pub" and b"PUBLIC KEY" in pub.read_bytes()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and b"PRIVATE KEY" in key.read_bytes()
    other_key, other_pub = keygen(tmp_path / "keys" / "other.pem")
    signed = pack_bundle([builds.here], tmp_path / "signed.edgepkg", sign_with=key)
    with tarfile.open(signed.path) as tar:
        assert tar.getnames()[:2] == ["manifest.json", "manifest.sig"]
    assert inspect_bundle(signed.path).signature == "signed (not checked)"
    assert verify_bundle(signed.path).signature == "signed (not checked)"
    assert verify_bundle(signed.path, pubkey=pub).signature.startswith("signature verified")
    with pytest.raises(BundleError, match="does not match"):
        verify_bundle(signed.path, pubkey=other_pub)
    with pytest.raises(BundleError, match="does not match"):
        open_bundle(signed.path, pubkey=other_pub)
    assert open_bundle(signed.path, pubkey=pub).is_dir()
    unsigned = pack_bundle([builds.here], tmp_path / "unsigned.edgepkg")
    with pytest.raises(BundleError, match="unsigned") as info:
        verify_bundle(unsigned.path, pubkey=pub)
    assert "--sign" in info.value.hint
    with pytest.raises(BundleError, match="not an unencrypted PEM private key"):
        pack_bundle([builds.here], tmp_path / "bad.edgepkg", sign_with=pub)
    with pytest.raises(Exception, match="already exists"):
        keygen(key)


def test_failed_or_refused_packaging_leaves_no_file(builds, exported, tmp_path):
    from edgekit.errors import OutputExistsError

    with pytest.raises(BundleError, match="does not end in .edgepkg"):
        pack_bundle([builds.here], tmp_path / "model.tar")
    with pytest.raises(BundleError, match="different model"):
        pack_bundle([builds.here, exported("LlamaForCausalLM", "ort")], tmp_path / "two.edgepkg")
    with pytest.raises(BundleError, match="given twice"):
        pack_bundle([builds.here, builds.here], tmp_path / "twice.edgepkg")
    with pytest.raises(BundleError, match="key"):
        pack_bundle([builds.here], tmp_path / "nokey.edgepkg", sign_with=tmp_path / "missing.pem")
    assert list(tmp_path.iterdir()) == []  # no output and no temporary file
    (tmp_path / "x.edgepkg").write_text("old")
    for force in (False, True):  # --force replaces only a bundle that edgekit wrote
        with pytest.raises(OutputExistsError):
            pack_bundle([builds.here], tmp_path / "x.edgepkg", force=force)
    assert (tmp_path / "x.edgepkg").read_text() == "old"
    (tmp_path / "x.edgepkg").unlink()
    pack_bundle([builds.here], tmp_path / "x.edgepkg")
    pack_bundle([builds.here], tmp_path / "x.edgepkg", force=True)
    assert [p.name for p in tmp_path.iterdir()] == ["x.edgepkg"]


def test_same_folders_make_the_same_bytes(builds, bundle, tmp_path):
    again = pack_bundle([builds.here, builds.other], tmp_path / "again.edgepkg")
    assert again.path.read_bytes() == bundle.read_bytes()


def test_bundle_code_imports_no_export_dependency():
    root = Path(__file__).resolve().parents[2] / "edgekit" / "bundle"
    heavy = re.compile(r"^\s*(import|from)\s+(torch|transformers|onnx|onnxscript|onnx_ir)\b", re.MULTILINE)
    for module in sorted(root.glob("*.py")):
        assert not heavy.search(module.read_text()), module


def test_cli(builds, tmp_path):
    env = {"EDGEKIT_CACHE": str(tmp_path / "cache")}
    out = tmp_path / "m.edgepkg"
    made = edgekit("package", str(builds.here), str(builds.other), "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert "packaged" in made.stderr and builds.other_profile in made.stderr
    shown = edgekit("inspect", str(out), "--json")
    assert shown.returncode == 0, shown.stderr
    assert [e["profile"] for e in json.loads(shown.stdout)["manifest"]["engines"]] == [builds.here_profile,
                                                                                      builds.other_profile]
    table = edgekit("inspect", str(out))
    assert table.returncode == 0 and "cpu_flags=" in table.stdout and builds.other_profile in table.stdout
    checked = edgekit("verify", str(out))
    assert checked.returncode == 0 and "verified" in checked.stderr and "unsigned" in checked.stderr
    ran = edgekit("run", str(out), "--prompt-ids", "1,2,3", "--max-new-tokens", "8", "--json", env=env)
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["token_ids"] == _tokens(builds.here)
    forced = edgekit("run", str(out), "--profile", builds.other_profile, "--prompt-ids", "1", "--json", env=env)
    assert forced.returncode == 1 and "error:" in forced.stderr and "hint:" in forced.stderr
    assert "Traceback" not in forced.stderr
    keyed = edgekit("keygen", "-o", str(tmp_path / "k.pem"))
    assert keyed.returncode == 0 and (tmp_path / "k.pem.pub").is_file()
    wrong = edgekit("verify", str(out), "--pubkey", str(tmp_path / "k.pem.pub"))
    assert wrong.returncode == 1 and "unsigned" in wrong.stderr and "hint:" in wrong.stderr


def _machine(gpus=(), jetson=False, flags=("avx2", "fma", "sse4_2"), providers=None):
    from edgekit.doctor import Gpu, Machine

    return Machine(cpu_model="test", arch="aarch64" if jetson else "x86_64", cpu_flags=tuple(sorted(flags)), cores=8,
                   ram_gb=64.0, gpus=tuple(Gpu(*g) for g in gpus), is_jetson=jetson, driver_version=None,
                   cuda_version=None, tensorrt_version="10.3.0.30" if jetson else None, onnxruntime_version="1.22",
                   onnxruntime_package="onnxruntime-gpu",
                   providers=providers or {"CUDAExecutionProvider": "works", "CPUExecutionProvider": "works"})


def _engine(engine_id, runtime, requirements, kind="build"):
    return {"id": engine_id, "profile": None if kind == "export" else engine_id, "kind": kind, "runtime": runtime,
            "requirements": requirements}


def test_choice_prefers_this_machines_profile_then_builds_then_gpus(tmp_path):
    from edgekit.bundle import choose_engine

    cuda = {"device": "gpu", "compute_capability": "8.9", "onnxruntime_provider": "CUDAExecutionProvider"}
    engines = [_engine("export-ort", "ort-cpu", {"device": "cpu"}, kind="export"),
               _engine("cpu-x86-64", "ort-cpu", {"device": "cpu", "cpu_flags": ["avx2", "fma"]}),
               _engine("l4", "ort-cuda", cuda),
               _engine("jetson-orin-nano-8gb", "tensorrt",
                       {"device": "jetson", "compute_capability": "8.7", "tensorrt": "10.3"})]
    manifest = {"engines": engines}
    pick = lambda machine, **kw: choose_engine(manifest, tmp_path / "m.edgepkg", machine=machine, **kw)["id"]  # noqa: E731
    assert pick(_machine(gpus=[("NVIDIA L4", "8.9", 22.5)])) == "l4"
    assert pick(_machine(gpus=[("NVIDIA L4", "8.9", 22.5)]), profile="cpu-x86-64") == "cpu-x86-64"
    assert pick(_machine(gpus=[("NVIDIA H200", "9.0", 139.8)])) == "cpu-x86-64"  # the L4 build is not for sm_90
    assert pick(_machine()) == "cpu-x86-64"
    assert pick(_machine(flags=("sse4_2",))) == "export-ort"  # an old CPU: only the portable export fits
    # A native TensorRT plan runs where its board and TensorRT version are.
    assert pick(_machine(gpus=[("Orin", "8.7", 7.4)], jetson=True, flags=("asimd",)),
                profile="jetson-orin-nano-8gb") == "jetson-orin-nano-8gb"
