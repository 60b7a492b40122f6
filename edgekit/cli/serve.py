"""``edgekit serve PATH``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import typer
from rich.markup import escape

from edgekit.cli._output import console
from edgekit.errors import EdgekitError, require

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    model_id: str = typer.Option(None, "--model-id",
                                 help="The model name clients see (default: the folder's name; a bundle's model)."),
) -> None:
    """Serve PATH over HTTP with OpenAI-compatible /v1/completions and /v1/chat/completions."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from edgekit.serve.app import ServeConfig, create_app

    if not 0 < port < 65536:
        raise EdgekitError(f"--port {port} is not a TCP port", "use e.g. --port 8000")
    sockets = _bind(host, port)  # before the model loads: a port in use fails now, not after "serving"
    try:
        from edgekit.cli._progress import progress_bar

        with progress_bar() as progress:  # a bundle's unpack and a big model's load take a while
            progress(f"opening {path.name}", 0, 2)
            folder, model_id = _model_folder(path, profile, model_id)
            progress(f"loading {Path(folder).name} and allocating its cache", 1, 2)
            app = create_app(folder, ServeConfig(max_batch, max_context, api_key or None, threads, model_id))
        _announce(app.state.server, host, port, api_key)
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                               log_level=os.environ.get("EDGEKIT_LOG_LEVEL", "warning")))
        try:
            server.run(sockets=sockets)
        except KeyboardInterrupt:  # Ctrl-C is how a server is stopped: uvicorn has shut down cleanly
            return
        if not server.started:
            raise EdgekitError(f"the server on {host}:{port} did not start (see the log above)",
                               "rerun with EDGEKIT_LOG_LEVEL=info for details")
    finally:
        for sock in sockets:
            sock.close()


def _model_folder(path: Path, profile: str | None, model_id: str | None) -> tuple[Path, str | None]:
    """The folder to load and the name to serve it under (None: the folder's name)."""
    if path.suffix == ".edgepkg":
        from edgekit.bundle import inspect_bundle, open_bundle

        name = model_id or inspect_bundle(path).name  # the unpacked folder is named after its engine
        return open_bundle(path, profile=profile), name
    if profile is not None:
        raise EdgekitError("--profile applies to bundles (FILE.edgepkg)", "pass a .edgepkg file, or drop --profile")
    return path, model_id


def _announce(server, host: str, port: int, api_key: str | None) -> None:
    if server.engine.max_batch > 1:
        mode = f"continuous batching, up to {server.engine.max_batch} sequences"
    else:
        mode = f"one request at a time ({server.serial_reason or '--max-batch 1'})"
    cache = f" · cache {server.engine.cache_bytes / 2**20:.0f} MiB" if server.engine.cache_bytes else ""
    console.print(f"serving [bold]{escape(server.model_id)}[/] on http://{escape(host)}:{port}/v1 · {escape(mode)} · "
                  f"context {server.max_context}{cache}{' · API key required' if api_key else ''}", soft_wrap=True)
    if host not in LOOPBACK and not api_key:
        console.print("[yellow]warning:[/] listening beyond loopback without --api-key")


def _bind(host: str, port: int) -> list[socket.socket]:
    """Sockets bound to every address of ``host`` on ``port`` (as asyncio's ``create_server`` binds
    them), for uvicorn to listen on; raises EdgekitError naming the address when one cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise EdgekitError(f"--host {host} is not an address of this machine ({exc.strerror})",
                           "use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):  # getaddrinfo may repeat an address
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a closed port's TIME_WAIT is free
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise _bind_error(host, port, exc) from None
    return sockets


def _bind_error(host: str, port: int, exc: OSError) -> EdgekitError:
    if exc.errno == errno.EADDRINUSE:
        free = _free_port(host, port)
        other = f"--port {free}" if free else "another --port"
        return EdgekitError(f"port {port} on {host} is already in use",
                            f"stop the process that holds it (e.g. `lsof -i :{port}`), or serve on {other}")
    if exc.errno == errno.EACCES:
        return EdgekitError(f"no permission to listen on {host}:{port}",
                            "ports below 1024 need root: use e.g. --port 8000")
    if exc.errno == errno.EADDRNOTAVAIL:
        return EdgekitError(f"--host {host} is not an address of this machine",
                            "use --host 127.0.0.1 (this machine only) or --host 0.0.0.0 (every interface)")
    return EdgekitError(f"cannot listen on {host}:{port} ({exc.strerror or exc})", "choose another --host or --port")


def _free_port(host: str, port: int) -> int | None:
    """A port just above ``port`` that ``host`` can bind now, if one of the next few is free."""
    for candidate in range(port + 1, min(port + 10, 65536)):
        try:
            for sock in _bind(host, candidate):
                sock.close()
            return candidate
        except EdgekitError:
            continue
    return None
