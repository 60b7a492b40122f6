"""Progress on the long commands, as a terminal shows it: a bar on stderr while build quantizes,
validate --quality scores, bench runs and serve starts; nothing of it with --json, on stdout, or
when stderr is not a terminal."""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import subprocess
import sys
import threading
import time

import pytest
from rich.console import Console

from edgekit.cli._progress import progress_bar
from edgekit.export.presets import TRAINED

ARCH = "Qwen3ForCausalLM"
HELDOUT = TRAINED["tiny-code"] / "heldout.txt"
PROGRESS_WORDS = ("quantizing", "scoring", "warmup", "run 1/", "loading", "━")


class Terminal:
    """A command whose stderr is a terminal (a pty) and whose stdout is a pipe, as `cmd > out.json` in a shell."""

    def __init__(self, *args: str):
        master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
        env.pop("NO_COLOR", None)
        self.proc = subprocess.Popen([sys.executable, "-c", "from edgekit.cli import main; main()", *args],
                                     stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        self.master, self.chunks = master, []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: every writer of the pty has closed it
                return
            if not data:
                return
            self.chunks.append(data)

    @property
    def stderr(self) -> str:
        return b"".join(self.chunks).decode(errors="replace")

    def finish(self, timeout: float = 600) -> tuple[int, str, str]:
        stdout, _ = self.proc.communicate(timeout=timeout)
        self.reader.join(timeout=10)
        os.close(self.master)
        return self.proc.returncode, stdout.decode(), self.stderr


def run_in_terminal(*args: str) -> tuple[int, str, str]:
    return Terminal(*args).finish()


def _has_progress(stderr: str) -> bool:
    return any(word in stderr for word in PROGRESS_WORDS)


def test_the_bar_draws_on_a_terminal_only():
    shown = io.StringIO()
    with progress_bar(console=Console(file=shown, force_terminal=True, width=100)) as update:
        update("quantizing [weights]", 3, 7)  # brackets: user text, not Rich markup
    assert "quantizing [weights]" in shown.getvalue() and "3/7" in shown.getvalue()
    for console, enabled in ((Console(file=io.StringIO(), force_terminal=False), True),
                             (Console(file=io.StringIO(), force_terminal=True), False)):
        with progress_bar(enabled, console=console) as update:
            update("quantizing", 1, 2)
        assert console.file.getvalue() == ""


@pytest.fixture(scope="module")
def export_dir(exported):
    return str(exported(ARCH))


def test_build_with_quantization_shows_progress_and_json_stays_clean(export_dir, tmp_path):
    args = ("build", export_dir, "--profile", "cpu-x86-64", "--quant", "int4")
    code, stdout, stderr = run_in_terminal(*args, "-o", str(tmp_path / "a"))
    assert code == 0, stderr
    assert "int4: quantizing weights" in stderr and "built" in stderr and stdout == ""
    code, stdout, stderr = run_in_terminal(*args, "-o", str(tmp_path / "b"), "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["quantization"] == "int4"  # stdout is the JSON and nothing else
    assert not _has_progress(stderr), stderr


def test_validate_quality_shows_progress(export_dir, hf_folder):
    args = ("validate", export_dir, "--reference", str(hf_folder(ARCH)), "--quality", str(HELDOUT), "--max-tokens", "300")
    code, stdout, stderr = run_in_terminal(*args)
    assert code in (0, 1), stderr  # a random-weight model may fail the quality bar; the progress is what is tested
    assert "scoring heldout.txt" in stderr and stdout == ""
    code, stdout, stderr = run_in_terminal(*args, "--json")
    assert {"perplexity", "top1_agreement"} <= set(json.loads(stdout)) and not _has_progress(stderr), stderr


def test_bench_shows_progress_and_json_stays_clean(export_dir):
    args = ("bench", export_dir, "--prompt-lengths", "8", "--new-tokens", "3", "--runs", "1", "--warmup", "1")
    code, stdout, stderr = run_in_terminal(*args)
    assert code == 0, stderr
    assert "edgekit · warmup · prompt 8" in stderr and "decode tok/s" in stderr and stdout == ""
    code, stdout, stderr = run_in_terminal(*args, "--json")
    assert code == 0, stderr
    assert json.loads(stdout)["contenders"][0]["name"] == "edgekit"
    assert not any(word in stderr for word in ("warmup · prompt", "loading edgekit")), stderr


def test_serve_start_up_shows_progress(export_dir):
    pytest.importorskip("uvicorn", reason="serve needs the serve extra")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    terminal = Terminal("serve", export_dir, "--port", str(port), "--max-batch", "1")
    try:
        deadline = time.monotonic() + 300
        while "serving" not in terminal.stderr and terminal.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        stderr = terminal.stderr
        assert "serving" in stderr, stderr
        assert stderr.index("loading") < stderr.index("serving")
    finally:
        terminal.proc.terminate()
        terminal.finish(timeout=60)
