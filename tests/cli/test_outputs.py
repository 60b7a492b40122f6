"""What `--force` may replace, hints that never point an output at an input, Ctrl-C during an
export, and install hints printed whole (not eaten as Rich markup). Checked as printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.test_cli import edgekit


def _user_folder(path: Path) -> Path:
    path.mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def test_force_refuses_a_folder_edgekit_did_not_write(tmp_path):
    precious = _user_folder(tmp_path / "precious")
    result = edgekit("export", "tiny-code", "-o", str(precious), "--force")
    assert result.returncode == 1, result.stderr
    assert f"error: --force replaces only an edgekit export, and {precious} is not something edgekit wrote" \
        in result.stderr
    assert "hint: choose another -o" in result.stderr
    assert (precious / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["precious"]


def test_the_hint_for_a_hugging_face_folder_never_names_it_as_the_output(hf_folder, tmp_path):
    model = tmp_path / "mymodel"
    shutil.copytree(hf_folder("Qwen3ForCausalLM"), model)
    result = edgekit("run", str(model), "--prompt", "x")
    assert result.returncode == 1
    assert f"hint: it looks like a Hugging Face model: export it first: edgekit export {model} -o {model}-edgekit" \
        in result.stderr
    # Following a hint that named the model as -o, then --force, must not replace the checkpoint.
    for extra in ([], ["--force"]):
        result = edgekit("export", str(model), "-o", str(model), *extra)
        assert result.returncode == 1
        assert f"error: output {model} would replace the input {model}" in result.stderr
    result = edgekit("export", str(model), "-o", str(tmp_path), "--force")  # a folder above the input
    assert result.returncode == 1 and "would replace the input" in result.stderr
    assert (model / "config.json").is_file() and (model / "model.safetensors").is_file()


def test_force_replaces_an_export_and_leaves_other_hidden_names_alone(exported, hf_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(exported("Qwen3ForCausalLM", "ort"), out)
    (out / "stale.txt").write_text("from an older export")
    lookalike = _user_folder(tmp_path / ".out.old")  # the name the old replacement step used
    result = edgekit("build", str(out), "--profile", "cpu-x86-64", "-o", str(out), "--force")
    assert result.returncode == 1 and f"would replace the input {out}" in result.stderr
    result = edgekit("build", str(exported("Qwen3ForCausalLM", "ort")), "--profile", "cpu-x86-64",
                     "--precision", "fp32", "-o", str(out), "--force")
    assert result.returncode == 1
    assert f"--force replaces only an edgekit build, and {out} is an edgekit export" in result.stderr
    from edgekit.export import export_model

    export_model(str(hf_folder("Qwen3ForCausalLM")), out, force=True)
    assert not (out / "stale.txt").exists() and json.loads((out / "edgekit.json").read_text())["kind"] == "export"
    assert (lookalike / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == [".out.old", "out"]  # nothing else left beside it


def test_force_refuses_files_that_are_not_bundles_or_keys(exported, tmp_path):
    notes = tmp_path / "notes.edgepkg"
    notes.write_text("mine")
    result = edgekit("package", str(exported("Qwen3ForCausalLM", "ort")), "-o", str(notes), "--force")
    assert result.returncode == 1
    assert f"--force replaces only an edgekit bundle, and {notes} is not something edgekit wrote" in result.stderr
    key = tmp_path / "key"
    key.write_text("mine")
    result = edgekit("keygen", "-o", str(key), "--force")
    assert result.returncode == 1 and f"--force replaces only a PEM key file, and {key} is not one" in result.stderr
    assert notes.read_text() == "mine" and key.read_text() == "mine"
    assert not (tmp_path / "key.pub").exists()


def test_force_replaces_what_edgekit_wrote(exported, tmp_path):
    export = str(exported("Qwen3ForCausalLM", "ort"))
    bundle, key = tmp_path / "m.edgepkg", tmp_path / "key"
    for _ in range(2):
        assert edgekit("package", export, "-o", str(bundle), "--force").returncode == 0
        assert edgekit("keygen", "-o", str(key), "--force").returncode == 0
    assert sorted(os.listdir(tmp_path)) == ["key", "key.pub", "m.edgepkg"]


def _export_cli(source: str, out: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "from edgekit.cli import main; main()", "export", source,
                             "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def test_ctrl_c_during_the_weights_says_where_a_rerun_resumes(hf_folder, tmp_path):
    source, out = str(hf_folder("Qwen3ForCausalLM")), tmp_path / "out"
    run = _export_cli(source, out, {"EDGEKIT_TEST_KILL_AFTER_TENSORS": "3", "EDGEKIT_TEST_KILL_SIGNAL": "INT"})
    _, stderr = run.communicate(timeout=600)
    assert run.returncode == 130, stderr
    assert "error: interrupted; rerun the same command to resume from tensor 4" in stderr
    assert "Traceback" not in stderr
    partial = tmp_path / ".out.partial"
    assert json.loads((partial / "weights.journal.json").read_text())["done"] == 3 and not out.exists()
    rerun = edgekit("export", source, "-o", str(out))
    assert rerun.returncode == 0 and "resumed after 3 tensors" in rerun.stderr
    assert not partial.exists()


def test_ctrl_c_before_any_weight_leaves_nothing(hf_folder, tmp_path):
    out = tmp_path / "out"
    run = _export_cli(str(hf_folder("Qwen3ForCausalLM")), out, {})
    partial = tmp_path / ".out.partial"
    deadline = time.monotonic() + 300
    while not partial.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    if (partial / "weights.journal.json").exists():
        pytest.fail("the export wrote weights before the test could interrupt its tracing")
    run.send_signal(2)  # SIGINT, as Ctrl-C sends: the export is tracing, no tensor written yet
    _, stderr = run.communicate(timeout=300)
    assert run.returncode == 130, stderr
    assert "error: interrupted before any weight was written; nothing was kept" in stderr
    assert os.listdir(tmp_path) == []


def test_install_hints_print_the_extra(tmp_path):
    code = ("import sys; sys.modules['torch'] = None\n"
            "sys.argv = ['edgekit', 'export', 'tiny-code', '-o', 'never-written']\n"
            "from edgekit.cli import main\nmain()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 1
    assert "hint: pip install 'edgekit-llm[export]'" in result.stderr
    assert os.listdir(tmp_path) == []


def test_force_never_replaces_a_folder_holding_a_file_the_build_reads(exported, tmp_path):
    out = _user_folder(tmp_path / "build")
    (out / "heldout.txt").write_text("def f():\n    return 1\n")
    result = edgekit("build", str(exported("Qwen3ForCausalLM", "ort")), "--profile", "cpu-x86-64", "-o", str(out),
                     "--force", "--quality", str(out / "heldout.txt"))
    assert result.returncode == 1
    assert f"error: output {out} would replace the input {out / 'heldout.txt'}" in result.stderr
    assert sorted(os.listdir(out)) == ["heldout.txt", "notes.txt"]
