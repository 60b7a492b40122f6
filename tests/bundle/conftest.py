"""Bundle fixtures: two ORT-CPU builds of one export (this machine's CPU profile and another
architecture's), and bundles of them, made once per session."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

ARCHITECTURE = "Qwen3ForCausalLM"


@pytest.fixture(scope="session")
def builds(exported, tmp_path_factory):
    """The export, a build for the CPU profile that fits here and one for another CPU architecture."""
    from edgekit.engines import build_engine
    from edgekit.doctor import detect, fitting_profile
    from edgekit.profiles import load_profile

    here = fitting_profile(detect())
    if here is None or load_profile(here).is_gpu:
        pytest.skip(f"no CPU profile fits this machine ({here})")
    other = "cpu-x86-64" if "arm" in here else "cpu-arm64"
    export = exported(ARCHITECTURE, "ort")
    root = tmp_path_factory.mktemp("bundle-builds")
    return SimpleNamespace(
        export=export, here_profile=here, other_profile=other,
        here=build_engine(export, here, root / here, precision="fp32").path,  # unquantized
        other=build_engine(export, other, root / other, precision="fp32").path,
    )


@pytest.fixture(scope="session")
def bundle(builds, tmp_path_factory) -> Path:
    """An unsigned bundle of both builds (treat as read-only: copy before tampering)."""
    from edgekit.bundle import pack_bundle

    out = tmp_path_factory.mktemp("bundles") / "model.edgepkg"
    pack_bundle([builds.here, builds.other], out)
    return out
