"""``edgekit bench`` as a user meets it: JSON on stdout, the table on stderr, a PNG, errors."""

from __future__ import annotations

import json

import pytest

from tests.cli.test_cli import edgekit

ARCH = "Qwen3ForCausalLM"


def test_json_on_stdout_table_on_stderr_and_a_plot(exported, tmp_path):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (pip install 'edgekit-llm[plot]')")
    png = tmp_path / "bench.png"
    result = edgekit("bench", str(exported(ARCH)), "--prompt-lengths", "8,16", "--new-tokens", "4", "--runs", "1",
                     "--warmup", "0", "--threads", "1", "--json", "--plot", str(png), "--compare", "optimum")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)  # nothing else on stdout
    assert data["settings"]["prompt_lengths"] == [8, 16] and data["settings"]["threads"] == 1
    assert [c["name"] for c in data["contenders"]] == ["edgekit", "optimum"]
    assert "decode tok/s" in result.stderr and "edgekit" in result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_json_to_a_file(exported, tmp_path):
    out = tmp_path / "bench.json"
    args = ("bench", str(exported(ARCH)), "--prompt-lengths", "8", "--new-tokens", "3", "--runs", "1", "--warmup", "0")
    result = edgekit(*args, "-o", str(out), "--measure-bandwidth")
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["settings"]["bandwidth_source"].startswith("measured") and data["settings"]["bandwidth_gbs"] > 0
    assert result.stdout == ""
    again = edgekit(*args, "--output", str(out), "--json")  # its own report is replaced; --json prints the same
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout) == json.loads(out.read_text())


def test_json_is_a_flag_like_everywhere_else(exported, tmp_path):
    """`--json` takes no value: a path after it is the command's PATH argument, not a file to write."""
    result = edgekit("bench", "--json", str(exported(ARCH)), "--prompt-lengths", "8", "--new-tokens", "3",
                     "--runs", "1", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["settings"]["prompt_lengths"] == [8]


@pytest.mark.parametrize("args, message", [
    (["--compare", "genia"], "Did you mean 'genai'"),
    (["--prompt-lengths", "8,x"], "--prompt-lengths '8,x' is not a comma-separated list"),
    (["--profile", "l5"], "profile 'l5' is not a shipped profile"),
])
def test_bad_options_say_what_to_do(exported, args, message):
    result = edgekit("bench", str(exported(ARCH)), "--runs", "1", *args)
    assert result.returncode == 1 and message in result.stderr and "hint:" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_folder_that_is_not_an_export(tmp_path):
    result = edgekit("bench", str(tmp_path))
    assert result.returncode == 1 and "is not an edgekit export" in result.stderr
