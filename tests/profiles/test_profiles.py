"""Hardware profiles: every shipped one loads; malformed ones fail naming the field."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edgekit.errors import ConfigError
from edgekit.profiles import PROFILE_DIR, list_profiles, load_profile, shipped_profiles

REQUIRED = {"jetson-orin-nano-8gb", "jetson-agx-orin-64gb", "rtx-4090", "l4", "cpu-x86-64", "cpu-x86-64-avx512", "cpu-arm64"}


def test_every_shipped_profile_loads():
    assert REQUIRED <= set(shipped_profiles())
    for profile in list_profiles():
        assert profile.hardware["memory_bandwidth_gbs"] > 0
        assert profile.defaults["precision"] in profile.hardware["precisions"]
        assert profile.shapes["prompt"].max <= profile.shapes["context"].max
        assert (profile.tensorrt is not None) == profile.is_gpu


def test_orin_has_no_fp8_and_ada_has_it():
    assert "fp8" not in load_profile("jetson-orin-nano-8gb").hardware["precisions"]
    assert "fp8" in load_profile("l4").hardware["precisions"]
    assert load_profile("jetson-orin-nano-8gb").tensorrt["min_version"] == "10.3"


def _write(tmp_path, edit):
    text = (PROFILE_DIR / "jetson-orin-nano-8gb.toml").read_text()
    path = tmp_path / "board.toml"
    path.write_text(edit(text))
    return path


@pytest.mark.parametrize("edit, field", [
    (lambda t: t.replace("memory_gb = 8.0", 'memory_gb = "eight"'), "[hardware].memory_gb"),
    (lambda t: t.replace('compute_capability = "8.7"', "compute_capability = 87"), "[hardware].compute_capability"),
    (lambda t: t.replace('"int8", "int4"]', '"int8", "int4", "fp8"]', 1), "[hardware].precisions"),
    (lambda t: t.replace('precision = "fp16"', 'precision = "bf16"'), "[defaults].precision"),
    (lambda t: t.replace("workspace_mb = 1024", "workspace_mb = -1"), "[tensorrt].workspace_mb"),
    (lambda t: t.replace("builder_optimization_level = 3", "builder_optimization_level = 9"), "[tensorrt].builder_optimization_level"),
    (lambda t: t.replace("prompt = [1, 256, 1024]", "prompt = [512, 256, 1024]"), "[shapes].prompt"),
    (lambda t: t.replace("prompt = [1, 256, 1024]", "prompt = [1, 256, 4096]"), "[shapes].prompt"),
    (lambda t: t.replace("intra_op_threads = 6", "intra_op_threds = 6"), "[onnxruntime].intra_op_threds"),
    (lambda t: t.replace('device = "jetson"', 'device = "tpu"'), "device"),
    (lambda t: t.replace('version_compatible = false', 'version_compatible = "no"'), "[tensorrt].version_compatible"),
])
def test_malformed_profile_names_the_field(tmp_path, edit, field):
    path = _write(tmp_path, edit)
    with pytest.raises(ConfigError) as info:
        load_profile(path)
    assert field in info.value.message and str(path) in info.value.message


def test_a_user_profile_by_path(tmp_path):
    path = _write(tmp_path, lambda t: t.replace('name = "jetson-orin-nano-8gb"', 'name = "my-board"'))
    assert load_profile(path).name == "my-board"
    assert load_profile(str(path)).path == path


def test_unknown_profile_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as info:
        load_profile("rtx-4080")
    assert "rtx-4090" in info.value.hint and "Did you mean 'rtx-4090'" in info.value.message


def test_toml_syntax_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="not readable TOML"):
        load_profile(path)


def _cli(*args):
    return subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                          capture_output=True, text=True, timeout=120)


def test_cli_list_and_show_json():
    listed = _cli("profiles", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    names = [p["name"] for p in json.loads(listed.stdout)]
    assert REQUIRED <= set(names)
    shown = _cli("profiles", "show", "l4", "--json")
    data = json.loads(shown.stdout)
    assert data["hardware"]["compute_capability"] == "8.9" and data["shapes"]["context"] == [1, 4096, 16384]
    bad = _cli("profiles", "show", "l5")
    assert bad.returncode == 1 and "error:" in bad.stderr and "hint:" in bad.stderr


@pytest.mark.parametrize("name", shipped_profiles())
def test_show_to_a_file_is_the_toml_and_loads_back(tmp_path, name):
    """`profiles show NAME > board.toml` gives the file itself (no wrapping when piped), which loads again."""
    original = PROFILE_DIR / f"{name}.toml"
    copy = tmp_path / "board.toml"
    with copy.open("w") as stdout:  # stdout is a file, as with `> board.toml`
        shown = subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", "profiles", "show", name],
                               stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120,
                               env={**os.environ, "COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    assert copy.read_text() == original.read_text()
    again = _cli("profiles", "show", str(copy), "--json")
    assert again.returncode == 0, again.stderr
    assert {**json.loads(again.stdout), "path": None} == {**load_profile(name).to_dict(), "path": None}


def test_list_at_80_columns_shows_every_name_whole():
    listed = subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", "profiles", "list"],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "80"})
    assert listed.returncode == 0, listed.stderr
    assert max(map(len, listed.stdout.splitlines())) <= 80
    cells = {cell.strip() for line in listed.stdout.splitlines() for cell in line.split("  ")}
    for profile in list_profiles():
        assert profile.name in cells
        for item in profile.hardware["precisions"] + profile.defaults["runtimes"]:
            assert item in listed.stdout.replace(",", " ").split()  # wrapped between items, never cut
