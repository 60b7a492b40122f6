"""``edgekit serve`` as a user starts it: a port in use fails up front, a bundle is served under its model's name."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.serve.conftest import free_port

CLI = [sys.executable, "-c", "from edgekit.cli import main; main()"]


def edgekit(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def test_port_in_use_fails_before_loading_with_a_hint(tiny_export):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = edgekit("serve", str(tiny_export), "--port", str(port), "--threads", "1")
    assert result.returncode == 1, result.stderr
    assert f"error: port {port} on 127.0.0.1 is already in use" in result.stderr
    assert "hint: stop the process that holds it" in result.stderr and "--port " in result.stderr
    assert "serving" not in result.stderr + result.stdout and "Traceback" not in result.stderr


def test_host_that_is_not_this_machine(tiny_export):
    result = edgekit("serve", str(tiny_export), "--host", "203.0.113.7", "--port", str(free_port()))  # TEST-NET-3
    assert result.returncode == 1
    assert "error: --host 203.0.113.7 is not an address of this machine" in result.stderr
    assert "hint: use --host 127.0.0.1" in result.stderr and "serving" not in result.stderr


def _wait_for_models(process: subprocess.Popen, url: str, log: Path) -> dict:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            return httpx.get(url, timeout=5).json()
        except httpx.TransportError:
            time.sleep(0.2)
    raise AssertionError(f"the server did not answer in 90 s: {log.read_text()}")


def test_bundle_is_served_under_the_models_name(tiny_export, tmp_path):
    from edgekit.bundle import pack_bundle

    bundle = pack_bundle([tiny_export], tmp_path / "release.edgepkg")
    source = json.loads((tiny_export / "edgekit.json").read_text())["model"]["source"]
    name = Path(source).name
    assert name and name != bundle.engines[0]["id"]
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "EDGEKIT_CACHE": str(tmp_path / "cache")}
    with log.open("w") as out:
        process = subprocess.Popen([*CLI, "serve", str(bundle.path), "--port", str(port), "--threads", "1"],
                                   stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        models = _wait_for_models(process, f"http://127.0.0.1:{port}/v1/models", log)
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C
        process.wait(timeout=30)
    assert [m["id"] for m in models["data"]] == [name]
    assert f"serving {name} on http://127.0.0.1:{port}/v1" in log.read_text()
    assert process.returncode == 0, log.read_text()
