"""``edgekit serve PATH --replicas N``: the same FastAPI app as N Ray Serve replicas.

    client ──HTTP──> Ray Serve proxy + router (least loaded of two) ──> replica 1: create_app(PATH) (own engine,
                                                                    └─> replica 2: create_app(PATH)  own scheduler)

Each replica builds the app of ``edgekit.serve.app.create_app`` when it starts (so each owns its
engine, its continuous batching and its metrics); the proxy forwards requests unchanged, so the
OpenAI routes, streaming, ``/health`` and ``/metrics`` are the same as ``edgekit serve`` alone.
Every response carries ``x-edgekit-replica: ID``, and ``/metrics`` from a replica labels each
sample ``replica="ID"``; Ray Serve's own per-replica series (requests, latency, ongoing requests)
are on each node's Ray metrics port. ``ray`` (the ``ray`` extra) is imported only here.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray import serve

from edgekit.errors import EdgekitError
from edgekit.serve.app import ServeConfig

APP_NAME = "edgekit"
REPLICA_HEADER = "x-edgekit-replica"
# A Prometheus text sample: name, optional {labels}, then the value (and an optional timestamp).
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?(\s.*)$")


@dataclass(frozen=True)
class ReplicaOptions:
    """How many replicas (or the autoscaling bounds, ``replicas`` then being the initial count), and
    what Ray reserves for each."""

    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max): scale on ongoing requests per replica
    cpus: float = 1.0  # reserved per replica; also its ONNX Runtime threads unless --threads says otherwise
    gpus: float = 0.0


@serve.ingress()  # the app is built in each replica (`__serve_build_asgi_app__`), not pickled from here
class EdgekitReplica:
    """One replica: loads PATH (a folder, or a bundle opened for the replica's own machine)."""

    def __init__(self, path: str, config: ServeConfig, profile: str | None = None):
        self.path, self.config, self.profile = path, config, profile

    def __serve_build_asgi_app__(self):
        from edgekit.serve.app import create_app

        folder, model_id = open_model(Path(self.path), self.profile, self.config.model_id)
        app = create_app(folder, dataclasses.replace(self.config, model_id=model_id))
        replica = serve.get_replica_context().replica_id.unique_id
        app.add_middleware(_ReplicaLabel, replica=replica)
        return app


def open_model(path: Path, profile: str | None, model_id: str | None) -> tuple[Path, str | None]:
    """The folder to load and the name to serve it under; a bundle is unpacked on this machine."""
    if not path.exists():
        raise EdgekitError(f"{path} does not exist on this node",
                           "every node that runs a replica needs PATH: use a shared filesystem, or copy it there")
    if path.suffix == ".edgepkg":
        from edgekit.bundle import inspect_bundle, open_bundle

        return open_bundle(path, profile=profile), model_id or inspect_bundle(path).name
    return path, model_id


def deployment(path: Path, config: ServeConfig, options: ReplicaOptions, profile: str | None = None):
    """The bound Ray Serve application: ``options.replicas`` (or autoscaled) replicas of PATH."""
    config = dataclasses.replace(config, threads=config.threads or max(1, int(options.cpus)))
    cls = serve.deployment(EdgekitReplica, name="EdgekitReplica", **deployment_options(config, options))
    return cls.bind(str(Path(path).resolve()), config, profile)


def deployment_options(config: ServeConfig, options: ReplicaOptions) -> dict[str, Any]:
    """``serve.deployment`` keyword arguments for these options (plain data)."""
    # Two requests per row: the router holds the rest, and a replica always has its next job queued.
    settings: dict[str, Any] = {"max_ongoing_requests": 2 * config.max_batch, "health_check_period_s": 10,
                                "ray_actor_options": {"num_cpus": options.cpus, "num_gpus": options.gpus}}
    if options.autoscale is None:
        return {**settings, "num_replicas": options.replicas}
    low, high = options.autoscale
    return {**settings, "autoscaling_config": {"min_replicas": low, "max_replicas": high,
                                               "initial_replicas": min(max(options.replicas, low), high),
                                               "target_ongoing_requests": config.max_batch}}


def start_replicas(path: Path, config: ServeConfig, options: ReplicaOptions, host: str, port: int,
                   address: str | None = None, profile: str | None = None, timeout_s: float = 300) -> None:
    """Connect to Ray (``address``, or a local instance), start Serve's proxy on host:port and deploy
    the replicas; returns when they are all ready. ``stop_replicas`` undoes it."""
    import ray

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as exc:
            raise EdgekitError(f"cannot reach a Ray cluster at --ray-address {address} ({exc})",
                               "start one with `ray start --head`, or drop --ray-address for a local instance") from None
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the CLI says when it is serving
    serve.start(http_options={"host": host, "port": port})
    target = serve.RunTarget(deployment(path, config, options, profile), name=APP_NAME, route_prefix="/")
    # Not serve.run's own wait: it has no deadline, and replicas that no node can place wait forever.
    serve.run_many([target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False)
    _wait_running(path, timeout_s)


def _wait_running(path: Path, timeout_s: float) -> None:
    """Return when the application runs; raise EdgekitError when it failed or is not up in ``timeout_s``."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        app = serve.status().applications.get(APP_NAME)
        state = str(app.status) if app is not None else "NOT_STARTED"
        if state.endswith("RUNNING"):
            return
        if state.endswith("DEPLOY_FAILED") or state.endswith("UNHEALTHY"):
            messages = [d.message for d in app.deployments.values() if d.message] + [app.message]
            raise EdgekitError(f"the replicas of {path} did not start: {_last_line(messages[0])}",
                               "run `edgekit serve PATH` without --replicas to see the error on its own")
        time.sleep(0.5)
    raise EdgekitError(f"the replicas of {path} were not all running after {timeout_s:g} s",
                       "check that the cluster has a free CPU (and GPU, with --gpus-per-replica) per replica: "
                       "`ray status`")


def stop_replicas(local: bool) -> None:
    """Delete the application and disconnect; on a ``local`` instance Serve and Ray stop too (on a
    cluster, its Serve proxy and other applications stay)."""
    import ray

    try:
        if ray.is_initialized():
            serve.delete(APP_NAME)
            if local:
                serve.shutdown()
    finally:
        ray.shutdown()


def _last_line(text: str) -> str:
    """The last non-empty line of Ray's message (a replica's traceback ends with the exception)."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    # "edgekit.errors.EdgekitError: --max-context ..." -> "--max-context ..."
    return re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1]) if lines else "no message from Ray"


def label_metrics(text: str, replica: str) -> str:
    """Prometheus text with ``replica="ID"`` added to every sample (comments pass unchanged)."""
    label = f'replica="{replica}"'
    lines = []
    for line in text.splitlines():
        match = _SAMPLE.match(line) if line and not line.startswith("#") else None
        if match:
            name, labels, rest = match.groups()
            line = f"{name}{{{label}{',' + labels if labels else ''}}}{rest}"
        lines.append(line)
    return "\n".join(lines) + ("\n" if text.endswith("\n") else "")


class _ReplicaLabel:
    """Pure ASGI middleware: the replica's id on every response, and as a label on /metrics samples."""

    def __init__(self, app: Any, replica: str):
        self.app, self.replica = app, replica
        self.header = (REPLICA_HEADER.encode(), replica.encode())

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["path"] == "/metrics":
            return await self._metrics(scope, receive, send)

        async def tagged(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, tagged)

    async def _metrics(self, scope, receive, send):
        """/metrics is small: buffer it, label it, send it with its length corrected."""
        start, body = {}, []

        async def collect(message):
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))

        await self.app(scope, receive, collect)
        data = label_metrics(b"".join(body).decode(), self.replica).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(data)).encode()), self.header]})
        await send({"type": "http.response.body", "body": data})
