"""Fixtures of the sweep tests: the shared local Ray instance and the tiny export."""

from __future__ import annotations

import pytest

from tests.sweep.ray_local import ray_local  # noqa: F401  (a fixture)


@pytest.fixture(scope="session")
def sweep_export(exported):
    return exported("Qwen3ForCausalLM", "ort")
