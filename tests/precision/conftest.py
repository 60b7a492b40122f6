"""Fixtures shared by the precision tests: the trained tiny-code preset exported as a GPU graph."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_code_portable(tmp_path_factory):
    """The tiny-code preset (trained, so quality figures mean something) exported fp32 for the portable target."""
    from edgekit.export import export_model

    out = tmp_path_factory.mktemp("tiny-code-portable") / "export"
    export_model("tiny-code", out, target="portable", dtype="fp32")
    return out


@pytest.fixture(scope="session")
def tiny_code_stats(tiny_code_portable):
    """matmul_input_stats of the fp32 tiny-code export on the preset's calibration text."""
    from edgekit.export.presets import TRAINED
    from edgekit.precision.calibrate import calibration_windows, matmul_input_stats
    from edgekit.types import ExportedGraph

    graph = ExportedGraph.load(tiny_code_portable)
    windows = calibration_windows(graph, TRAINED["tiny-code"] / "calibration.txt")
    return matmul_input_stats(graph.model_path, graph, windows)


# -- fp16 / bf16 (test_half.py) -----------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_code_export(tmp_path_factory, tiny_code_portable):
    """factory(target) -> the trained tiny-code preset exported fp32 for ``target`` (cached per session)."""
    from edgekit.export import export_model

    made = {"portable": tiny_code_portable}

    def make(target: str):
        if target not in made:
            out = tmp_path_factory.mktemp(f"tiny-code-{target}") / "export"
            export_model("tiny-code", out, target=target, dtype="fp32")
            made[target] = out
        return made[target]

    return make


@pytest.fixture(scope="session")
def islands():
    """benchmarks/half_precision_islands.py as a module: ProtoSession, compare, compare_decode."""
    import importlib.util
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "half_precision_islands.py"
    spec = importlib.util.spec_from_file_location("half_precision_islands", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
