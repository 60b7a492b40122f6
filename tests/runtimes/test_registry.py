"""The runtime registry: runtimes found by name, one file adds one, every caller opens engines
through ``open_engine``, and the device side imports no torch, transformers or export code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "edgekit"

# A whole runtime in one file: ONNX Runtime's CPU provider under another name, so that a build for it
# and a run of it exercise the registry end to end (plan, build, open) without any edit to edgekit.
EXTRA_RUNTIME = '''
"""A runtime from outside the package: the CPU provider, one request at a time, under its own name."""
from dataclasses import replace

from edgekit.runtimes.ort_cpu import RUNTIME as CPU

RUNTIME = replace(CPU, names=("ort-cpu-extra",), family="extra")
'''


def _subprocess(code: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **(env or {})}, cwd=ROOT)


def test_every_shipped_runtime_is_found_by_its_names():
    from edgekit.runtimes.registry import get_runtime, runtime_names

    assert {"ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"} <= set(runtime_names())
    for name in runtime_names():
        runtime = get_runtime(name)
        assert name in runtime.names and runtime.device in ("cpu", "gpu") and runtime.extra
    assert get_runtime("ort", prefer=["tensorrt", "ort-cuda"]).names == ("ort-cuda",)  # a family: the profile's first


def test_an_unknown_runtime_names_the_known_ones(exported):
    from tests.cli.test_cli import edgekit

    result = edgekit("build", str(exported("Qwen3ForCausalLM", "ort")), "--profile", "cpu-x86-64",
                     "--runtime", "ort-cpu2", "--dry-run")
    assert result.returncode == 1
    assert "error: --runtime 'ort-cpu2' is not one of ort, ort-cpu, ort-cuda, ort-tensorrt, tensorrt" in result.stderr
    assert "Did you mean 'ort-cpu'?" in result.stderr


def test_a_runtime_is_one_file_outside_the_package(exported, tmp_path):
    """Register a runtime module from a temporary folder; build for it with a profile that lists it; run it."""
    module = tmp_path / "extra_runtime.py"
    module.write_text(EXTRA_RUNTIME)
    profile = tmp_path / "extra.toml"
    shipped = (PACKAGE / "profiles" / "cpu-x86-64.toml").read_text()
    profile.write_text(re.sub(r'(?m)^runtimes = .*$', 'runtimes = ["ort-cpu-extra"]', shipped)
                       .replace('name = "cpu-x86-64"', 'name = "extra"'))
    build = tmp_path / "build"
    code = f"""
        from edgekit.engines import build_engine
        from edgekit.generate import generate
        from edgekit.runtimes.registry import open_engine
        engine = build_engine({str(exported("Qwen3ForCausalLM", "ort"))!r}, {str(profile)!r}, {str(build)!r},
                              precision="fp32")
        assert engine.runtime == "ort-cpu-extra", engine.runtime
        print(generate(open_engine({str(build)!r}), [5, 6, 7], 6).token_ids)
    """
    with_extra = _subprocess(code, {"EDGEKIT_RUNTIMES": str(module)})
    assert with_extra.returncode == 0, with_extra.stderr[-3000:]
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine

    assert with_extra.stdout.split("\n")[-2] == str(generate(open_engine(exported("Qwen3ForCausalLM", "ort")),
                                                            [5, 6, 7], 6).token_ids)
    without = _subprocess(f"from edgekit.runtimes.registry import open_engine; open_engine({str(build)!r})",
                          {"EDGEKIT_RUNTIMES": ""})
    assert "runtime 'ort-cpu-extra' is not one of" in without.stderr


def test_no_caller_binds_to_a_runtime_or_compares_runtime_names():
    """Runtime names appear as strings only in their own runtime modules (and in the sidecar default)."""
    names = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")
    pattern = re.compile(r"""(==|!=|\bin\b)\s*\(?\s*["'](%s)["']|["'](%s)["']\s*(==|!=)""" % ("|".join(names), "|".join(names)))
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "runtimes":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if pattern.search(line) or "OrtSession(" in line or "open_session(" in line:
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


DEVICE_SIDE = ["edgekit.cli", "edgekit.cli.run", "edgekit.cli.serve", "edgekit.cli.package", "edgekit.cli.bench",
               "edgekit.cli.build", "edgekit.generate", "edgekit.chat", "edgekit.bundle", "edgekit.bundle.cache",
               "edgekit.serve.app", "edgekit.serve.engine", "edgekit.bench", "edgekit.bench.contenders",
               "edgekit.engines", "edgekit.runtimes.registry", "edgekit.runtimes.onnxruntime",
               "edgekit.runtimes.onnxruntime_build", "edgekit.runtimes.tensorrt", "edgekit.runtimes.ort_cpu",
               "edgekit.runtimes.ort_cuda", "edgekit.runtimes.ort_tensorrt"]


@pytest.mark.parametrize("module", DEVICE_SIDE)
def test_the_device_side_imports_no_torch_transformers_or_export_code(module):
    result = _subprocess(f"""
        import importlib, sys
        for name in ("torch", "transformers"):
            sys.modules[name] = None  # importing them raises
        importlib.import_module({module!r})
        from edgekit.runtimes.registry import runtimes
        runtimes()  # discovery imports every runtime module
        bad = sorted(m for m in sys.modules if m.startswith("edgekit.export") or m.split(".")[0] in
                     ("torch", "transformers", "onnxscript") and sys.modules[m] is not None)
        assert not bad, bad
    """)
    assert result.returncode == 0, result.stderr[-2000:]


def test_profiles_import_nothing_but_types_and_errors():
    result = _subprocess("""
        import sys
        import edgekit.profiles, edgekit.profiles._schema
        from edgekit.profiles import list_profiles, load_profile
        list_profiles()
        loaded = sorted(m for m in sys.modules if m.startswith("edgekit."))
        assert set(loaded) <= {"edgekit.errors", "edgekit.types", "edgekit.profiles", "edgekit.profiles._schema"}, loaded
    """)
    assert result.returncode == 0, result.stderr[-2000:]


def _imports(path: Path) -> set[str]:
    """The edgekit stages a module imports, at module level or inside functions."""
    found = re.findall(r"^\s*(?:from|import)\s+edgekit\.(\w+)", path.read_text(), re.M)
    return set(found)


def test_no_cycles_between_stages():
    """Stage packages (export, engines, quantize, bundle, serve, bench, runtimes, profiles) form no import cycle."""
    stages = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} - {"cli", "data"}
    edges = {stage: set() for stage in stages}
    for stage in stages:
        for path in (PACKAGE / stage).rglob("*.py"):
            edges[stage] |= {other for other in _imports(path) if other in stages and other != stage}

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in edges[start])

    cycles = sorted(f"{a} -> {b} -> ... -> {a}" for a in stages for b in edges[a] if reaches(b, a, {b}))
    assert not cycles, "\n".join(cycles)


def test_a_broken_runtime_module_is_named_without_a_traceback(exported, tmp_path):
    from tests.cli.test_cli import edgekit

    module = tmp_path / "broken.py"
    module.write_text("import no_such_sdk\n")
    result = edgekit("build", str(exported("Qwen3ForCausalLM", "ort")), "--profile", "cpu-x86-64", "--dry-run",
                     env={"EDGEKIT_RUNTIMES": str(module)})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"error: runtime module {module} failed to import (ModuleNotFoundError: No module named 'no_such_sdk')" \
        in result.stderr


def test_an_engine_of_an_unknown_runtime_fits_nowhere_but_does_not_stop_the_choice(tmp_path):
    from edgekit.bundle import choose_engine
    from edgekit.doctor import detect

    def engine(name, runtime):
        return {"id": name, "kind": "build", "profile": None, "runtime": runtime, "requirements": {"device": "cpu"}}

    manifest = {"engines": [engine("npu", "ort-npu"), engine("cpu", "ort-cpu")]}
    assert choose_engine(manifest, tmp_path / "m.edgepkg", machine=detect())["id"] == "cpu"
    from edgekit.runtimes.registry import engine_missing

    assert engine_missing("ort-npu", {}, detect())[0].startswith("runtime 'ort-npu' is not one this edgekit knows")


def test_onnx_runtime_refuses_a_graph_its_sessions_cannot_open(exported):
    from edgekit.engines import BuildRefused, plan_build

    with pytest.raises(BuildRefused, match="is a bf16 export; edgekit's ONNX Runtime sessions run fp32 and fp16"):
        plan_build(exported("Qwen3ForCausalLM", "ort", "bf16"), "l4", runtime="ort-cuda", precision="bf16")
