"""One local Ray instance for every test that needs one (tests/sweep, tests/serve/test_replicas.py).

Ray takes seconds to start on two cores: the first test that asks starts it with the resources
all of them need (2 CPUs, and the host profile twice, as ``edgekit sweep`` would offer it), the
others reuse it, and the fixture that started it stops it at the end of the session.
"""

from __future__ import annotations

import pytest


def host_profile() -> str:
    """The shipped profile of this machine (what a sweep's cells are built for)."""
    from edgekit.doctor import detect, fitting_profile

    return fitting_profile(detect()) or "cpu-x86-64"


@pytest.fixture(scope="session")
def ray_local():
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.serve")
    if ray.is_initialized():
        yield ray
        return
    ray.init(num_cpus=2, resources={f"profile:{host_profile()}": 2}, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
