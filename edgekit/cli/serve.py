"""``edgekit serve PATH``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from edgekit.cli._output import console
from edgekit.errors import EdgekitError, require


def serve(
    path: Path = typer.Argument(..., help="An export or build folder, or a bundle (FILE.edgepkg)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (loopback unless told otherwise)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: int = typer.Option(8, "--max-batch",
                                  help="Sequences decoded together; more requests wait in FIFO order."),
    max_context: int = typer.Option(None, "--max-context",
                                    help="Tokens per sequence, prompt + completion (default: min(model, 4096))."),
    api_key: str = typer.Option(None, "--api-key", envvar="EDGEKIT_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1 endpoints."),
    threads: int = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: all cores)."),
    profile: str = typer.Option(None, "--profile", help="With a bundle: this profile's engine, not the best fit."),
    model_id: str = typer.Option(None, "--model-id", help="The model name clients see (default: the folder name)."),
) -> None:
    """Serve PATH over HTTP with OpenAI-compatible /v1/completions and /v1/chat/completions."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from edgekit.serve.app import ServeConfig, create_app

    if not 0 < port < 65536:
        raise EdgekitError(f"--port {port} is not a TCP port", "use e.g. --port 8000")
    if path.suffix == ".edgepkg":
        from edgekit.bundle import open_bundle

        path = open_bundle(path, profile=profile)
    elif profile is not None:
        raise EdgekitError("--profile applies to bundles (FILE.edgepkg)", "pass a .edgepkg file, or drop --profile")
    config = ServeConfig(max_batch, max_context, api_key or None, threads, model_id)
    app = create_app(path, config)
    server = app.state.server
    if server.engine.max_batch > 1:
        mode = f"continuous batching, up to {server.engine.max_batch} sequences"
    else:
        mode = f"one request at a time ({server.serial_reason or '--max-batch 1'})"
    cache = f" · cache {server.engine.cache_bytes / 2**20:.0f} MiB" if server.engine.cache_bytes else ""
    console.print(f"serving [bold]{server.model_id}[/] on http://{host}:{port}/v1 · {mode} · "
                  f"context {server.max_context}{cache}{' · API key required' if api_key else ''}")
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        console.print("[yellow]warning:[/] listening beyond loopback without --api-key")
    uvicorn.run(app, host=host, port=port, log_level=os.environ.get("EDGEKIT_LOG_LEVEL", "warning"))
