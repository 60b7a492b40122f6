"""Cells as Ray tasks, each placed by the custom resource ``profile:<name>`` of its profile.

A node offers a profile by starting with it (``ray start --address HEAD:6379 --resources
'{"profile:jetson-orin-nano-8gb": 1}'``); a task asks for one unit, so a node with one unit runs
one build or bench at a time (a bench must not share its device). A local instance (no address)
offers each CPU profile of the sweep once per CPU, and a GPU profile once when it is this machine's.
``ray`` is imported only here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ray

from edgekit.errors import EdgekitError
from edgekit.sweep.cells import run_cell


def resource(profile_name: str) -> str:
    return f"profile:{profile_name}"


def connect(address: str | None, local_resources: dict[str, float], cpus: int | None) -> bool:
    """Connect to ``address`` or start a local instance; True when this call started Ray (and must stop it)."""
    if ray.is_initialized():  # a caller (a notebook, a test) already chose the cluster
        return False
    quiet = {"include_dashboard": False, "log_to_driver": False}
    if address is None:
        ray.init(num_cpus=cpus, resources=local_resources, **quiet)
        return True
    try:
        ray.init(address=address, **quiet)
    except ConnectionError as exc:
        raise EdgekitError(f"cannot reach a Ray cluster at --ray-address {address} ({exc})",
                           "start one with `ray start --head`, or drop --ray-address for a local instance") from None
    return True


def ship(data: bytes) -> list:
    """The export in Ray's object store, wrapped in a list so a task fetches it only if it needs it."""
    return [ray.put(data)]


def run_tasks(jobs: list[dict[str, Any]], profile_names: dict[str, str], timeout_s: float | None,
              done: Callable[[dict[str, Any]], None]) -> None:
    """Submit every job, then hand each result to ``done`` as it arrives (a failed task, a missing node
    or the timeout becomes a failed result: one cell never stops the others)."""
    offered = ray.cluster_resources()
    remote = ray.remote(run_cell)
    pending: dict[Any, dict[str, Any]] = {}
    for job in jobs:
        name = resource(profile_names[job["id"]])
        if offered.get(name, 0) < 1:
            done(_failed(job, "schedule", f"no node of the Ray cluster offers the resource {name}",
                         f"start a worker for it: ray start --address HEAD:6379 --resources '{{\"{name}\": 1}}'"))
            continue
        # max_retries 1: a node that dies (a Jetson rebooting) gets the cell rerun elsewhere, once
        ref = remote.options(num_cpus=1, resources={name: 1}, max_retries=1, name=f"edgekit-cell-{job['id']}").remote(job)
        pending[ref] = job
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=left)
        if not ready:  # the sweep's time is up: what has not finished fails, named
            for ref, job in pending.items():
                ray.cancel(ref, force=True)
                done(_failed(job, "timeout", f"did not finish within --timeout {timeout_s:g} s",
                             "raise --timeout, or check that the node offering its profile is busy or stuck"))
            return
        for ref in ready:
            job = pending.pop(ref)
            try:
                result = ray.get(ref)
            except Exception as exc:  # the worker died, or Ray could not run the task
                first = (str(exc).splitlines() or [""])[0]
                result = _failed(job, "task", f"the Ray task failed: {type(exc).__name__}: {first}",
                                 "see the worker's log (ray logs), or rerun the sweep: done cells are kept")
            done(result)  # outside the try: a failure storing the result is not the task's, and counts once


def _failed(job: dict[str, Any], stage: str, error: str, hint: str) -> dict[str, Any]:
    return {"id": job["id"], **job["cell"], "status": "failed", "stage": stage, "error": error, "hint": hint,
            "refused": False, "node": None, "seconds": 0.0}


def disconnect() -> None:
    ray.shutdown()
