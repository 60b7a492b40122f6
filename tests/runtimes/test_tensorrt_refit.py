"""Weight-stripped TensorRT plans as data: the plan asks for them, other runtimes refuse them, and
a plan refits only from the very weights it was built with (TensorRT itself would not notice)."""

from __future__ import annotations

import shutil

import pytest

from edgekit.engines import BuildRefused, plan_build
from edgekit.errors import ArtifactError
from edgekit.runtimes.tensorrt import refit_identity
from edgekit.runtimes.tensorrt_session import refit_source


def test_strip_weights_is_planned_for_tensorrt_and_refused_elsewhere(exported):
    path = exported("Qwen3ForCausalLM", "decomposed")
    plan = plan_build(path, "l4", runtime="tensorrt", precision="fp16", strip_weights=True)
    assert plan.tensorrt["strip_weights"] is True and plan.tensorrt["refit_from"] == "model.onnx"
    assert plan_build(path, "l4", runtime="tensorrt", precision="fp16").tensorrt["strip_weights"] is False
    with pytest.raises(BuildRefused, match="--strip-weights applies to plans that refit at load, not ort-cpu"):
        plan_build(exported("Qwen3ForCausalLM", "ort"), "cpu-x86-64", strip_weights=True)


def test_the_plan_doubles_the_cache_it_ping_pongs(exported):
    path = exported("Qwen3ForCausalLM", "decomposed")
    trt = plan_build(path, "l4", runtime="tensorrt", precision="fp16").memory
    ep = plan_build(path, "l4", runtime="ort-tensorrt", precision="fp16").memory
    assert trt["kv_cache_bytes"] == 2 * ep["kv_cache_bytes"] > 0


def test_a_stripped_plan_refits_only_from_its_own_weights(exported, tmp_path):
    export = exported("Qwen3ForCausalLM", "decomposed")
    recorded = refit_identity(export / "model.onnx")
    assert set(recorded) == {"model.onnx", "model.onnx.data"}
    settings = {"strip_weights": True, "refit_from": "model.onnx"}
    other = tmp_path / "other"  # same graph, other weights: what a wrong folder would hold
    shutil.copytree(export, other)
    data = other / "model.onnx.data"
    data.write_bytes(bytes(b ^ 1 for b in data.read_bytes()))
    plan = tmp_path / "build" / "model.plan"
    assert refit_source(plan, settings, (tmp_path / "nothing", other, export), recorded) == export / "model.onnx"
    with pytest.raises(ArtifactError, match="built without its weights"):
        refit_source(plan, settings, (other,), recorded)
    assert refit_source(plan, {"strip_weights": False}, (), recorded) is None  # a full plan needs none


def test_a_hardware_compatible_plan_runs_on_any_ampere_or_newer_gpu(exported, tmp_path):
    from edgekit.profiles import PROFILE_DIR

    board = tmp_path / "l4-any-ampere.toml"
    board.write_text((PROFILE_DIR / "l4.toml").read_text().replace('hardware_compatibility = "none"',
                                                                  'hardware_compatibility = "ampere_plus"'))
    path = exported("Qwen3ForCausalLM", "decomposed")
    assert plan_build(path, board, runtime="tensorrt", precision="fp16").requirements["compute_capability"] == ">=8.0"
    assert plan_build(path, "l4", runtime="tensorrt", precision="fp16").requirements["compute_capability"] == "8.9"
