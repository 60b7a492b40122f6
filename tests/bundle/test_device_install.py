"""The device story for real: a clean virtual environment with only ``pip install edgekit-llm[cpu]``
(no torch, no transformers, no onnxscript) verifies, inspects and runs a signed bundle without
importing onnx, and builds an export for this machine (int4 and fp32) with onnx alone.

Installs from PyPI (numpy, onnxruntime, onnx, onnx-ir, typer, rich, tokenizers, cryptography) into
a fresh venv, so it needs the package index that CI's setup already uses; pip's cache keeps it to
about a minute. One venv serves every check.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EXPORT_SIDE = ("torch", "transformers", "onnxscript")  # never installed on a device
GRAPH_LIBS = ("onnx", "onnx_ir")  # installed with [cpu] for `edgekit build`; run, verify and inspect do without
HEAVY = (*EXPORT_SIDE, *GRAPH_LIBS)
# Runs the edgekit command, then reports (at exit, whatever the outcome) which heavy modules were imported.
WRAPPER = f"""
import atexit, json, sys
atexit.register(lambda: sys.stderr.write("HEAVY=" + json.dumps(sorted(
    m for m in sys.modules if m.split(".")[0] in {HEAVY!r} or m.startswith("edgekit.export"))) + "\\n"))
import edgekit
sys.stderr.write("EDGEKIT=" + edgekit.__file__ + "\\n")
sys.argv = ["edgekit", *sys.argv[1:]]
from edgekit.cli import main
main()
"""


def _source_tree(dest: Path) -> Path:
    """What the sdist would hold, copied so that pip builds nothing inside the shared checkout."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, dest / name)
    shutil.copytree(ROOT / "edgekit", dest / "edgekit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _clean_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "EDGEKIT_CACHE": str(tmp_path / "device-cache"), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _run(command: list[str], env: dict, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def test_cpu_install_verifies_and_runs_a_bundle_without_torch(builds, tmp_path):
    from edgekit.bundle import keygen, pack_bundle
    from tests.bundle.test_bundle import _tokens

    key, pub = keygen(tmp_path / "release.pem")
    bundle = pack_bundle([builds.here, builds.other], tmp_path / "model.edgepkg", sign_with=key).path
    src = _source_tree(tmp_path / "src")
    venv, env = tmp_path / "venv", _clean_env(tmp_path)
    made = _run([sys.executable, "-m", "venv", str(venv)], env, tmp_path)  # a clean venv: no system site-packages
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    installed = _run([str(python), "-m", "pip", "install", "-q", f"{src}[cpu]"], env, tmp_path, timeout=600)
    assert installed.returncode == 0, installed.stdout + installed.stderr

    for module in EXPORT_SIDE:
        absent = _run([str(python), "-c", f"import {module}"], env, tmp_path)
        assert absent.returncode != 0 and "ModuleNotFoundError" in absent.stderr, module

    def edgekit(*args: str, allowed: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
        result = _run([str(python), "-c", WRAPPER, *args], env, tmp_path)
        assert f"EDGEKIT={venv}" in result.stderr, result.stderr  # the installed package, not the checkout
        heavy = json.loads(result.stderr.rsplit("HEAVY=", 1)[1].splitlines()[0])
        assert [m for m in heavy if m.split(".")[0] not in allowed] == [], result.stderr
        return result

    verified = edgekit("verify", str(bundle), "--pubkey", str(pub), "--json")
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["signature"].startswith("signature verified")
    shown = edgekit("inspect", str(bundle), "--json")
    assert shown.returncode == 0 and len(json.loads(shown.stdout)["manifest"]["engines"]) == 2
    ran = edgekit("run", str(bundle), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout)["token_ids"] == _tokens(builds.here, steps=4)
    script = _run([str(venv / "bin" / "edgekit"), "verify", str(bundle)], env, tmp_path)  # the console script
    assert script.returncode == 0 and "signed (not checked)" in script.stderr, script.stderr
    _builds_on_the_device(edgekit, builds, tmp_path)


def _builds_on_the_device(edgekit, builds, tmp_path: Path) -> None:
    """`edgekit build` with the device extras: the profile's default (int4 on CPUs) and plain fp32."""
    from tests.bundle.test_bundle import _tokens

    int4 = edgekit("build", str(builds.export), "--profile", builds.here_profile, "-o", str(tmp_path / "b4"),
                   "--json", allowed=GRAPH_LIBS)
    assert int4.returncode == 0, int4.stderr
    assert json.loads(int4.stdout)["quantization"] == "int4"
    ran = edgekit("run", str(tmp_path / "b4"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert ran.returncode == 0 and len(json.loads(ran.stdout)["token_ids"]) == 4, ran.stderr
    fp32 = edgekit("build", str(builds.export), "--profile", builds.here_profile, "--precision", "fp32",
                   "--quant", "none", "-o", str(tmp_path / "b32"), allowed=GRAPH_LIBS)
    assert fp32.returncode == 0 and "built" in fp32.stderr, fp32.stderr
    ran = edgekit("run", str(tmp_path / "b32"), "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert ran.returncode == 0 and json.loads(ran.stdout)["token_ids"] == _tokens(builds.here, steps=4), ran.stderr
