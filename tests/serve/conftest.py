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
