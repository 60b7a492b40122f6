"""edgekit build: plans as data, every refusal with its hint, and real ONNX Runtime CPU builds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edgekit.engines import BuildRefused, build_engine, plan_build
from edgekit.engines.plan import fit_positions
from edgekit.profiles import PROFILE_DIR, list_profiles, load_profile
from edgekit.types import Engine, ExportedGraph
from tests.cli.test_cli import edgekit
from tests.conftest import family_names

GPU_PROFILES = [p.name for p in list_profiles() if p.is_gpu]


def _here():
    from edgekit.doctor import detect, fitting_profile

    name = fitting_profile(detect())
    if name is None or load_profile(name).is_gpu:
        pytest.skip(f"no CPU profile fits this machine ({name})")
    return name


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_tensorrt_plan_for_every_gpu_profile(exported, name):
    path = exported("Qwen3ForCausalLM", "decomposed")
    profile, _ = fit_positions(ExportedGraph.load(path), load_profile(name))  # the tiny model has 1024 positions
    plan = plan_build(path, name, runtime="tensorrt", precision="fp16")
    trt = plan.tensorrt
    assert plan.runtime == "tensorrt" and plan.precision == "fp16" and plan.quantization == "none"
    assert trt["flags"] == [] and trt["strongly_typed"] is True  # fp16 is in the graph (plan.graph), not a flag
    assert trt["workspace_bytes"] == profile.tensorrt["workspace_mb"] * 2**20
    assert trt["builder_optimization_level"] == profile.tensorrt["builder_optimization_level"]
    assert trt["hardware_compatibility"] == profile.tensorrt["hardware_compatibility"]
    assert trt["version_compatible"] == profile.tensorrt["version_compatible"]
    b, p, c = (profile.shapes[k] for k in ("batch", "prompt", "context"))
    shapes = trt["shape_profile"]
    assert shapes["input_ids"] == {"min": [b.min, 1], "opt": [b.opt, 1], "max": [b.max, p.max]}
    assert shapes["attention_mask"]["max"] == [b.max, c.max]
    assert shapes["past_key_values.1.value"] == {"min": [b.min, 2, 0, 32], "opt": [b.opt, 2, c.opt - 1, 32],
                                                 "max": [b.max, 2, c.max - 1, 32]}
    assert plan.requirements == {"device": profile.device, "compute_capability": profile.hardware["compute_capability"],
                                 "tensorrt": ">=" + profile.tensorrt["min_version"]}
    # layers*kv*(k,v)*D*fp16*ctx*batch, twice: a TensorRT session ping-pongs two copies of the cache
    assert plan.memory["kv_cache_bytes"] == 2 * 2 * 2 * 32 * 2 * c.max * b.max * 2
    assert plan.onnxruntime is None
    assert plan.shapes == {k: [v.min, v.opt, v.max] for k, v in profile.shapes.items()}


def test_plans_stop_at_the_model_positions(exported, tmp_path):
    """A 1024-position model is planned at 1024 tokens, not at the profile's 4096 / 16384, and the plan says so."""
    path = exported("Qwen3ForCausalLM", "decomposed")
    positions = ExportedGraph.load(path).model.max_position_embeddings
    assert positions == 1024
    l4 = load_profile("l4").shapes
    plan = plan_build(path, "l4", runtime="tensorrt", precision="fp16")
    assert plan.shapes["context"] == [l4["context"].min, positions, positions] and plan.memory["context"] == positions
    assert plan.shapes["prompt"] == [l4["prompt"].min, l4["prompt"].opt, positions]
    assert plan.tensorrt["shape_profile"]["attention_mask"]["max"] == [l4["batch"].max, positions]
    assert plan.tensorrt["shape_profile"]["past_key_values.0.key"]["max"][2] == positions - 1
    assert any("context capped at the model's 1024 positions" in note and "16384" in note for note in plan.notes)
    board = tmp_path / "board.toml"  # a context no memory holds: planned at the model's 1024, not refused
    board.write_text((PROFILE_DIR / "jetson-orin-nano-8gb.toml").read_text()
                     .replace("context = [1, 1024, 2048]", "context = [1, 1024, 50000000]"))
    assert plan_build(path, board, runtime="tensorrt").memory["context"] == positions
    assert plan_build(exported("Qwen3ForCausalLM", "ort"), "cpu-x86-64").shapes["context"][2] == positions


@pytest.mark.parametrize("name", GPU_PROFILES)
def test_ort_gpu_plans(exported, name):
    profile = load_profile(name)
    cuda = plan_build(exported("Qwen3ForCausalLM", "ort", "fp16"), name, runtime="ort-cuda")
    assert cuda.onnxruntime["providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert cuda.onnxruntime["provider_options"][0] == profile.onnxruntime["provider_options"]
    assert cuda.requirements["onnxruntime_provider"] == "CUDAExecutionProvider"
    if "ort-tensorrt" in profile.defaults["runtimes"]:
        ep = plan_build(exported("Qwen3ForCausalLM", "decomposed"), name, runtime="ort-tensorrt", precision="fp16")
        options = ep.onnxruntime["provider_options"][0]
        assert options["trt_fp16_enable"] is False and options["trt_dump_ep_context_model"] is True  # strongly typed
        assert options["trt_ep_context_embed_mode"] == 1 and ep.onnxruntime["model_file"] == "model_ctx.onnx"
        assert options["trt_profile_min_shapes"].startswith("input_ids:1x1,attention_mask:1x1,past_key_values.0.key:1x2x0x32")


def test_refuses_fp8_on_orin(exported):
    with pytest.raises(BuildRefused) as info:
        plan_build(exported("Qwen3ForCausalLM", "decomposed"), "jetson-orin-nano-8gb", precision="fp8")
    assert "fp8" in info.value.message and "8.7" in info.value.message and "fp16" in info.value.hint


def test_refuses_contrib_ops_for_tensorrt(exported):
    with pytest.raises(BuildRefused) as info:
        plan_build(exported("Qwen3ForCausalLM", "ort"), "l4", runtime="tensorrt")
    assert "com.microsoft.GroupQueryAttention" in info.value.message and "--target portable" in info.value.hint


def test_refuses_opset23_attention_on_tensorrt_10_3(exported):
    with pytest.raises(BuildRefused) as info:
        plan_build(exported("MistralForCausalLM", "portable"), "jetson-agx-orin-64gb", runtime="tensorrt")
    assert "Attention" in info.value.message and "10.3" in info.value.message
    assert "--target decomposed" in info.value.hint
    plan = plan_build(exported("MistralForCausalLM", "portable"), "rtx-4090", runtime="tensorrt", precision="fp16")
    assert plan.runtime == "tensorrt"  # the same graph parses where the profile targets TensorRT >= 10.15


def test_refuses_ort_cuda_for_portable_graphs(exported):
    with pytest.raises(BuildRefused) as info:
        plan_build(exported("Qwen3ForCausalLM", "portable"), "l4", runtime="ort-cuda", precision="fp32")
    assert "--target ort" in info.value.hint


def test_refuses_more_memory_than_the_profile_has(exported, tmp_path):
    text = (PROFILE_DIR / "jetson-orin-nano-8gb.toml").read_text()
    board = tmp_path / "board.toml"
    board.write_text(text.replace("batch = [1, 1, 1]", "batch = [1, 1, 50000]"))
    with pytest.raises(BuildRefused) as info:
        plan_build(exported("Qwen3ForCausalLM", "decomposed"), board, runtime="tensorrt")
    assert "KV cache at 1024 tokens x batch 50000" in info.value.message and "8 GB" in info.value.message
    assert "[shapes].context" in info.value.hint


def test_refuses_gpu_runtimes_on_a_cpu_profile_and_unknown_values(exported):
    path = exported("Qwen3ForCausalLM", "ort")
    with pytest.raises(BuildRefused, match="needs an NVIDIA GPU"):
        plan_build(path, "cpu-x86-64", runtime="tensorrt")
    with pytest.raises(Exception, match="--runtime 'onnx'"):
        plan_build(path, "cpu-x86-64", runtime="onnx")
    with pytest.raises(Exception, match="--precision 'fp4'"):
        plan_build(path, "cpu-x86-64", precision="fp4")


def test_refuses_a_gpu_build_without_the_gpu(exported, tmp_path):
    """The real build (not --dry-run) checks this machine: here there is no NVIDIA GPU."""
    from edgekit.doctor import detect

    if detect().gpus:
        pytest.skip("this machine has a GPU")
    out = tmp_path / "b"
    with pytest.raises(BuildRefused) as info:
        build_engine(exported("Qwen3ForCausalLM", "ort", "fp16"), "l4", out, runtime="ort-cuda")
    assert "compute capability 8.9" in info.value.message and "target device" in info.value.hint
    with pytest.raises(BuildRefused, match="TensorRT"):
        build_engine(exported("Qwen3ForCausalLM", "decomposed"), "jetson-orin-nano-8gb", out, runtime="tensorrt")
    assert not out.exists()


def test_fp32_on_a_cpu_profile_is_unquantized(exported):
    plan = plan_build(exported("LlamaForCausalLM", "ort"), "cpu-x86-64", precision="fp32")
    assert load_profile("cpu-x86-64").defaults["quantization"] == "int4"
    assert plan.precision == "fp32" and plan.quantization == "none" and plan.runtime == "ort-cpu"


@pytest.mark.parametrize("architecture", family_names())
def test_ort_cpu_build_validates(exported, hf_folder, tmp_path, architecture):
    from edgekit.validate import validate

    profile = _here()
    out = tmp_path / "build"
    engine = build_engine(exported(architecture, "ort"), profile, out, precision="fp32")  # unquantized: exact parity
    assert engine.runtime == "ort-cpu" and engine.profile == profile and engine.kind == "build"
    assert engine.quantization == "none" and engine.graph.kind == "build"
    assert engine.source_export["model_sha256"]
    report = validate(out, str(hf_folder(architecture)), prompt_length=24, steps=16)
    assert report.passed and report.greedy_match == 16
    _check_last_logits(out, engine.graph)


def _check_last_logits(out, graph):
    """The build's LM head on the last position alone gives that position's logits, for every family."""
    import numpy as np

    from edgekit.runtimes.registry import open_engine

    assert Engine.load(out).details["graph_edits"]["logits_to_keep"] is True
    session = open_engine(out)
    ids = list(range(3, 3 + 11))
    session.reset(16)
    every = session.forward(ids)  # (S, vocab): validate's view
    session.reset(16)
    last = session.last_logits(ids)  # (vocab,)
    assert every.shape == (11, graph.model.vocab_size) and last.shape == (graph.model.vocab_size,)
    np.testing.assert_allclose(last, every[-1], atol=1e-4)
    assert session.last_logits([5]).shape == (graph.model.vocab_size,)  # decode after a last-only prefill


def test_build_for_other_hardware_is_refused(exported, tmp_path):
    from edgekit.errors import ArtifactError
    from edgekit.runtimes.registry import open_engine

    here = _here()
    other = "cpu-arm64" if "arm" not in here else "cpu-x86-64"
    out = tmp_path / "other"
    build_engine(exported("Qwen3ForCausalLM", "ort"), other, out)
    with pytest.raises(ArtifactError) as info:
        open_engine(out)
    assert other in info.value.message and here in info.value.message and "CPU flags" in info.value.message
    assert f"--profile {here}" in info.value.hint


def test_cli_dry_run_and_sidecar(exported, tmp_path):
    path = exported("Qwen2ForCausalLM", "ort")
    run = lambda *a: subprocess.run([sys.executable, "-c", "from edgekit.cli import main; main()", *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=300)
    dry = run("build", str(path), "--profile", "cpu-x86-64", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["runtime"] == "ort-cpu" and json.loads(dry.stdout)["buildable_here"] is True
    assert not list(tmp_path.iterdir())
    refused = run("build", str(path), "--profile", "jetson-orin-nano-8gb", "--precision", "fp8", "--dry-run")
    assert refused.returncode == 1 and "error:" in refused.stderr and "hint:" in refused.stderr
    out = tmp_path / "b"
    built = run("build", str(path), "--profile", _here(), "-o", str(out), "--json")
    assert built.returncode == 0, built.stderr
    sidecar = json.loads((out / "edgekit.json").read_text())
    assert sidecar["kind"] == "build" and sidecar["export"]["target"] == "ort"
    for key in ("runtime", "profile", "precision", "requirements", "onnxruntime_version", "source_export"):
        assert key in sidecar["build"]
    assert Engine.load(out).graph.model_file == "model.onnx" and ExportedGraph.load(out).kind == "build"



def test_cli_dry_run_is_a_summary_people_read(exported):
    """Without --json, --dry-run prints a short summary (not the plan's JSON one number per line),
    with the shapes capped at the model's positions and whether this machine can build it."""
    path = str(exported("Qwen3ForCausalLM", "decomposed"))
    shown = edgekit("build", path, "--profile", "l4", "--runtime", "tensorrt", "--precision", "fp16", "--dry-run",
                    env={"COLUMNS": "100"})
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert 8 <= len(lines) <= 25 and not shown.stdout.lstrip().startswith("{")
    text = " ".join(shown.stdout.split())
    for expected in ("runtime tensorrt", "precision fp16", "quantization none", "context 1/1024/1024",
                     "KV cache at 1024 tokens", "budget", "context capped at the model's 1024 positions",
                     "buildable here"):
        assert expected in text, (expected, shown.stdout)
    full = json.loads(edgekit("build", path, "--profile", "l4", "--runtime", "tensorrt", "--precision", "fp16",
                              "--dry-run", "--json").stdout)
    assert full["shapes"]["context"] == [1, 1024, 1024] and full["tensorrt"]["shape_profile"]
    from edgekit.doctor import detect

    if not detect().gpus:  # this machine lacks the L4: the plan says so, with the reason, and still exits 0
        assert full["buildable_here"] is False
        assert any("compute capability 8.9" in reason for reason in full["not_buildable_because"])
        assert "buildable here no: needs" in text and "compute capability 8.9" in text
