"""A live server on 127.0.0.1 (a uvicorn thread on a free port) over the tiny Qwen3 ort export."""

from __future__ import annotations

import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving ``create_app(folder, config)`` on a thread; ``url`` is its /v1 base."""

    def __init__(self, folder, **config):
        import uvicorn

        from edgekit.serve.app import ServeConfig, create_app

        self.app = create_app(folder, ServeConfig(**config))
        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start in 30 s"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.root}/v1"

    @property
    def scheduler(self):
        return self.app.state.server.scheduler

    def client(self, key: str = API_KEY):
        import openai

        return openai.OpenAI(base_url=self.url, api_key=key, timeout=60, max_retries=0)


@pytest.fixture(scope="session")
def tiny_export(exported):
    return exported("Qwen3ForCausalLM", "ort")


@pytest.fixture(scope="module")
def live(tiny_export):
    """Batched server (8 rows, so 16 clients also exercise the queue), with an API key."""
    with LiveServer(tiny_export, max_batch=8, max_context=256, api_key=API_KEY, threads=1) as server:
        yield server


@pytest.fixture(scope="session")
def tiny_code_export(tmp_path_factory):
    """The trained ``tiny-code`` preset exported for the ort target (as ``edgekit export tiny-code``)."""
    from edgekit.export import export_model

    out = tmp_path_factory.mktemp("tiny-code") / "export"
    export_model("tiny-code", out, target="ort", dtype="fp32")
    return out


class ServeProcess:
    """``edgekit serve FOLDER`` as a user starts it, in a subprocess, logging to a file."""

    def __init__(self, folder, tmp_path, *args: str, env: dict | None = None):
        import os
        import subprocess
        import sys

        self.port, self.log = free_port(), tmp_path / f"serve-{id(self)}.log"
        command = [sys.executable, "-c", "from edgekit.cli import main; main()", "serve", str(folder),
                   "--port", str(self.port), "--threads", "1", *args]
        with self.log.open("w") as out:
            self.process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                            env={**os.environ, **(env or {})})

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float = 120) -> "ServeProcess":
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log.read_text()
            try:
                httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=5).raise_for_status()
                return self
            except httpx.TransportError:
                time.sleep(0.2)
        raise AssertionError(f"edgekit serve did not answer in {timeout} s: {self.log.read_text()}")

    def stop(self, sig=None, timeout: float = 30) -> int:
        import signal

        if self.process.poll() is None:
            self.process.send_signal(sig or signal.SIGTERM)
        return self.process.wait(timeout=timeout)
