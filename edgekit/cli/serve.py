"""``edgekit serve PATH``: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import errno
import os
import signal
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
    prefix_cache_mb: int = typer.Option(512, "--prefix-cache-mb", help=(
        "Memory for computed prompt prefixes reused by later prompts (shared system prompt, growing chat); 0: off.")),
    prefill_batch: int = typer.Option(None, "--prefill-batch", help=(
        "Prompts prefilled in one forward when they join together (default: --max-batch; 1: one at a time).")),
    replicas: int = typer.Option(None, "--replicas", help=(
        "Serve N replicas on Ray Serve, each with its own engine (needs the ray extra).")),
    ray_address: str = typer.Option(None, "--ray-address", help=(
        "Deploy the replicas on this Ray cluster (e.g. ray://head:10001 or auto; default: a local instance).")),
    autoscale: str = typer.Option(None, "--autoscale", metavar="MIN:MAX", help=(
        "Let Ray Serve scale between MIN and MAX replicas on ongoing requests (--max-batch per replica).")),
    gpus_per_replica: float = typer.Option(0.0, "--gpus-per-replica", help=(
        "GPUs Ray reserves for each replica (e.g. 1 for a CUDA or TensorRT engine).")),
    speculative: str = typer.Option(None, "--speculative", help=(
        "Speculative decoding for a request decoding alone: ngram (prompt lookup), draft:PATH (a smaller "
        "export with the same tokenizer), draft (the one a build carries: build --draft) or mtp (the model's "
        "MTP head, export --mtp). Greedy output is unchanged; sampling keeps the "
        "model's distribution.")),
    draft_tokens: int = typer.Option(None, "--draft-tokens", help="Tokens proposed per step with --speculative (default 4; mtp: 1)."),
) -> None:
    """Serve PATH over HTTP with OpenAI-compatible /v1/completions and /v1/chat/completions."""
    require("fastapi", "serve")
    uvicorn = require("uvicorn", "serve")
    from edgekit.serve.app import ServeConfig, create_app, uvicorn_options
    from edgekit.serve.speculate import check_choice

    if not 0 < port < 65536:
        raise EdgekitError(f"--port {port} is not a TCP port", "use e.g. --port 8000")
    speculative = check_choice(speculative, draft_tokens)
    if replicas is not None or ray_address is not None or autoscale is not None:
        config = ServeConfig(max_batch, max_context, api_key or None, threads, model_id,
                             prefix_cache_mb=prefix_cache_mb, prefill_batch=prefill_batch,
                             speculative=speculative, draft_tokens=draft_tokens)
        return _serve_on_ray(path, config, host, port, profile, replicas, ray_address, autoscale, gpus_per_replica)
    sockets = _bind(host, port)  # before the model loads: a port in use fails now, not after "serving"
    try:
        from edgekit.cli._progress import progress_bar

        with progress_bar() as progress:  # a bundle's unpack and a big model's load take a while
            progress(f"opening {path.name}", 0, 2)
            folder, model_id = _model_folder(path, profile, model_id)
            progress(f"loading {Path(folder).name} and allocating its cache", 1, 2)
            app = create_app(folder, ServeConfig(max_batch, max_context, api_key or None, threads, model_id,
                                                 prefix_cache_mb=prefix_cache_mb, prefill_batch=prefill_batch,
                                                 speculative=speculative, draft_tokens=draft_tokens))
        _announce(app.state.server, host, port, api_key)
        options = uvicorn_options(os.environ.get("EDGEKIT_LOG_LEVEL", "warning"))  # + a bounded graceful shutdown
        server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))
        # uvicorn shuts down gracefully on SIGTERM too, then re-raises the signal: make that a clean exit as Ctrl-C
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        try:
            server.run(sockets=sockets)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM is how a server is stopped: uvicorn has shut down cleanly
            return
        if not server.started:
            raise EdgekitError(f"the server on {host}:{port} did not start (see the log above)",
                               "rerun with EDGEKIT_LOG_LEVEL=info for details")
    finally:
        for sock in sockets:
            sock.close()


def _serve_on_ray(path: Path, config, host: str, port: int, profile: str | None, replicas: int | None,
                  address: str | None, autoscale: str | None, gpus: float) -> None:
    """``--replicas`` / ``--autoscale`` / ``--ray-address``: the same app as Ray Serve replicas, until Ctrl-C."""
    if replicas is not None and replicas < 1:
        raise EdgekitError(f"--replicas {replicas} must be >= 1", "e.g. --replicas 2")
    bounds = _autoscale(autoscale) if autoscale is not None else None
    if profile is not None and path.suffix != ".edgepkg":
        raise EdgekitError("--profile applies to bundles (FILE.edgepkg)", "pass a .edgepkg file, or drop --profile")
    if not path.exists():
        raise EdgekitError(f"{path} does not exist", "pass an export or build folder, or a bundle (FILE.edgepkg)")
    require("ray", "ray")
    from edgekit.serve.replicas import ReplicaOptions, start_replicas, stop_replicas

    options = ReplicaOptions(replicas or (bounds[0] if bounds else 1), bounds, float(config.threads or 1), gpus)
    if address is None:  # a local instance: its proxy binds here, so a port in use fails now
        for sock in _bind(host, port):
            sock.close()
    console.print(f"starting {f'{bounds[0]}..{bounds[1]}' if bounds else options.replicas} replica(s) of "
                  f"{escape(path.name)} on {escape(address or 'a local Ray instance')}")
    try:
        start_replicas(path, config, options, host, port, address, profile)
        console.print(f"serving [bold]{escape(config.model_id or path.name)}[/] on http://{escape(host)}:{port}/v1 · "
                      f"Ray Serve · {'autoscaled ' + autoscale if bounds else f'{options.replicas} replicas'} · "
                      f"up to {config.max_batch} sequences each{' · API key required' if config.api_key else ''}",
                      soft_wrap=True)
        if host not in LOOPBACK and not config.api_key:
            console.print("[yellow]warning:[/] listening beyond loopback without --api-key")
        _wait_forever()
    except KeyboardInterrupt:  # Ctrl-C is how a server is stopped
        pass
    finally:
        stop_replicas(local=address is None)


def _autoscale(text: str) -> tuple[int, int]:
    """``--autoscale MIN:MAX`` -> (MIN, MAX), with 0 <= MIN <= MAX and MAX >= 1."""
    low, sep, high = text.partition(":")
    try:
        bounds = int(low), int(high)
    except ValueError:
        bounds = None
    if not sep or bounds is None or not 0 <= bounds[0] <= bounds[1] or bounds[1] < 1:
        raise EdgekitError(f"--autoscale {text} is not MIN:MAX", "e.g. --autoscale 1:4 (MIN <= MAX, MAX >= 1)")
    return bounds


def _wait_forever() -> None:
    """Block until Ctrl-C, or SIGTERM (a service manager's stop), which is handled the same way:
    the finally clause then stops the replicas instead of leaving a local Ray instance behind."""
    import signal
    import time

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    while True:
        time.sleep(3600)


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
    if server.speculator is not None:
        mode += f" · speculative {server.speculator.choice} (k={server.speculator.draft_tokens}) for a request alone"
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
