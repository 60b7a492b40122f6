"""GPU precisions in `edgekit build`: the plan / refusal matrix, memory from the graph's real bytes,
and --graph-only builds whose graph (the exact file a GPU runtime gets) is checked and run on ONNX
Runtime's CPU provider here."""

from __future__ import annotations

import json
import shutil
import types
from pathlib import Path

import numpy as np
import pytest

from edgekit.engines import BuildRefused, QuantOptions, build_engine, plan_build
from edgekit.errors import ConfigError, EdgekitError
from edgekit.export.presets import TRAINED
from edgekit.types import Engine, ExportedGraph

HELDOUT = TRAINED["tiny-code"] / "heldout.txt"  # any text will do as calibration for the tiny random models
PROFILES = ("rtx-4090", "l4", "jetson-orin-nano-8gb")
RUNTIMES = {"tensorrt": "decomposed", "ort-cuda": "ort"}  # the export target each runtime parses
PRECISIONS = ("fp16", "bf16", "int4", "int8", "fp8")
# (profile or "*", runtime or "*", precision) -> a phrase the refusal's message holds; every other cell plans.
REFUSED = {
    ("jetson-orin-nano-8gb", "*", "fp8"): "FP8 needs compute capability 8.9+",
    ("jetson-orin-nano-8gb", "*", "bf16"): "not in its [hardware].precisions",
    ("*", "ort-cuda", "fp8"): "no fp8 GEMM",
    ("*", "ort-cuda", "bf16"): "bind fp32 / fp16 caches only",
}
WEIGHTS = {"fp16": None, "bf16": None, "int4": "int4", "int8": "int8", "fp8": "fp8"}


def _refusal(profile: str, runtime: str, precision: str) -> str | None:
    for (p, r, q), phrase in REFUSED.items():
        if p in ("*", profile) and r in ("*", runtime) and q == precision:
            return phrase
    return None


@pytest.fixture(scope="module")
def exports(exported):
    return {runtime: exported("Qwen3ForCausalLM", target) for runtime, target in RUNTIMES.items()}


@pytest.mark.parametrize("profile", PROFILES)
def test_every_cell_is_a_plan_or_a_refusal_with_a_hint(exports, profile):
    """3 GPU profiles x 2 runtimes x 5 precisions: each a plan whose graph carries the precision,
    or a refusal saying why, with what to do instead."""
    for runtime, export in exports.items():
        for precision in PRECISIONS:
            phrase = _refusal(profile, runtime, precision)
            try:
                plan = plan_build(export, profile, runtime, precision, QuantOptions(calibration=str(HELDOUT)))
            except BuildRefused as refused:
                assert phrase is not None, (profile, runtime, precision, refused.message)
                assert phrase in refused.message and refused.hint, (profile, runtime, precision, refused.message)
                continue
            assert phrase is None, (profile, runtime, precision, "planned but expected a refusal")
            assert plan.precision == precision and plan.quantization == "none"
            graph = plan.graph
            assert graph["precision"] == precision and graph["weights"] == WEIGHTS[precision]
            assert graph["activations"] == (precision if precision in ("fp16", "bf16") else "fp16")
            if precision == "int8" and runtime == "tensorrt":  # TensorRT's INT8: weights and activations
                assert (graph["method"], graph["block_size"], graph["calibration"]) == ("smoothquant", None, str(HELDOUT))
            elif precision in ("int4", "int8"):
                assert (graph["block_size"], graph["method"], graph["lm_head"], graph["embeddings"]) == (128, "rtn", True, False)
            if precision == "fp8":
                assert graph["lm_head"] is False and graph["calibration"] == str(HELDOUT)
            if runtime == "tensorrt":  # the precision is in the graph: no builder precision flags (TensorRT 11)
                assert plan.tensorrt["flags"] == [] and plan.tensorrt["strongly_typed"] is True


def test_specific_cells(exports):
    orin = plan_build(exports["tensorrt"], "jetson-orin-nano-8gb", "tensorrt", "int4")
    assert orin.tensorrt["min_version"] == "10.3" and orin.graph["block_size"] == 128
    cuda = plan_build(exports["ort-cuda"], "l4", "ort-cuda", "int4", QuantOptions(block_size=64, method="awq",
                                                                                   calibration=str(HELDOUT)))
    assert (cuda.graph["method"], cuda.graph["block_size"], cuda.graph["calibration"]) == ("awq", 64, str(HELDOUT))
    assert cuda.onnxruntime["providers"][0] == "CUDAExecutionProvider"
    with pytest.raises(BuildRefused) as info:
        plan_build(exports["tensorrt"], "jetson-orin-nano-8gb", "tensorrt", "fp8")
    assert "compute capability 8.7" in info.value.message and "fp16" in info.value.hint
    assert plan_build(exports["tensorrt"], "rtx-4090", "tensorrt", "fp32").graph is None  # the export as it is


def test_contradictions_and_missing_inputs_are_refused(exports, exported):
    trt = exports["tensorrt"]
    with pytest.raises(BuildRefused, match="calibration text") as info:
        plan_build(trt, "l4", "tensorrt", "fp8")
    assert "--calibration" in info.value.hint
    with pytest.raises(BuildRefused, match="awq needs calibration"):
        plan_build(trt, "l4", "tensorrt", "int4", QuantOptions(method="awq"))
    with pytest.raises(ConfigError, match="gptq") as config:
        plan_build(trt, "l4", "tensorrt", "int4", QuantOptions(method="gptq"))
    assert "awq" in config.value.hint
    with pytest.raises(BuildRefused, match="take their quantization from --precision") as info:
        plan_build(trt, "l4", "tensorrt", None, QuantOptions("int4"))
    assert "--precision int4" in info.value.hint
    with pytest.raises(BuildRefused, match="CPU builds quantize") as info:
        plan_build(exports["ort-cuda"], "cpu-x86-64", None, "int4")
    assert "--quant int4" in info.value.hint
    with pytest.raises(BuildRefused, match="made from an fp32 export") as info:
        plan_build(exported("Qwen3ForCausalLM", "ort", "fp16"), "l4", "ort-cuda", "int4")
    assert "--dtype fp32" in info.value.hint


def _large(export, tmp_path, columns: int):
    """A copy of ``export`` whose LM head is declared (vocab x columns) wide: planning reads the
    initializers' shapes only, so the copy plans like a model of that size without holding it."""
    import onnx

    folder = tmp_path / "large"
    shutil.copytree(export, folder)
    proto = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    head = next(t for t in proto.graph.initializer if t.name == "lm_head.weight.transpose")
    head.dims[1] = columns
    onnx.save(proto, str(folder / "model.onnx"))
    return folder


def test_memory_refusal_names_the_precision_that_fits(exports, tmp_path):
    """12.8 GB of fp16 weights exceed the Orin Nano's 6 GB budget, int8 (6.6 GB) too; int4 fits."""
    big = _large(exports["tensorrt"], tmp_path, 100_000_000)  # a 64 x 1e8 MatMul weight: 6.4e9 values
    with pytest.raises(BuildRefused) as info:
        plan_build(big, "jetson-orin-nano-8gb", "tensorrt", "fp16")
    assert "fp16 weights 12.8" in info.value.message and "int4 would fit (3.4" in info.value.message
    assert "--precision int4" in info.value.hint and "[shapes].context" in info.value.hint
    int4 = plan_build(big, "jetson-orin-nano-8gb", "tensorrt", "int4")
    # 4 bits a weight, one fp16 scale per 128 of them along K (64 rows: one block per column)
    assert 3.2e9 + 2e8 <= int4.memory["weights_bytes"] < 3.2e9 + 2e8 + 2e6


def test_memory_from_the_graph_built(exports, tmp_path):
    """The plan's weight bytes are the initializer bytes of the graph --graph-only writes (within
    the fp32 islands' small tensors)."""
    import onnx

    for precision in ("fp16", "int4"):
        out = tmp_path / precision
        engine = build_engine(exports["tensorrt"], "l4", out, runtime="tensorrt", precision=precision, graph_only=True)
        proto = onnx.load(str(out / "model.onnx"))
        real = sum(len(t.raw_data) or _values_bytes(t) for t in proto.graph.initializer)
        planned = engine.details["memory"]["weights_bytes"]
        assert abs(planned - real) / real < 0.1, (precision, planned, real)
    fp32 = plan_build(exports["tensorrt"], "l4", "tensorrt", "fp32").memory["weights_bytes"]
    assert planned < 0.4 * fp32  # int4: most of this tiny model is its (fp16) embedding table


def _values_bytes(tensor) -> int:
    from onnx import numpy_helper

    return numpy_helper.to_array(tensor).nbytes


def test_graph_only_int4_is_the_form_tensorrt_takes(exports, tmp_path):
    """INT4 weight → DequantizeLinear(axis 0, block 128, fp16 scale, no zero point) → MatMul; no
    fp32 MatMul weight left; the sidecar records the graph and its contract; the graph runs on ORT CPU."""
    import onnx
    from onnx import TensorProto, helper

    out = tmp_path / "int4"
    engine = build_engine(exports["tensorrt"], "rtx-4090", out, runtime="tensorrt", precision="int4", graph_only=True)
    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    dqs = [producer[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in producer
           and producer[n.input[1]].op_type == "DequantizeLinear"]
    assert len(dqs) == 15  # 7 projections x 2 layers + the LM head
    for dq in dqs:
        attrs = {a.name: helper.get_attribute_value(a) for a in dq.attribute}
        assert inits[dq.input[0]].data_type == TensorProto.INT4 and inits[dq.input[1]].data_type == TensorProto.FLOAT16
        assert attrs["axis"] == 0 and attrs["block_size"] == 128 and len([i for i in dq.input if i]) == 2
    matmul_weights = [inits[n.input[1]] for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert all(t.data_type != TensorProto.FLOAT for t in matmul_weights)
    b = engine.details
    assert b["graph_only"] is True and b["model_file"] == "model.onnx" and b["graph"]["weights"] == "int4"
    assert "DequantizeLinear" in b["graph"]["ops"] and not any("." in op for op in b["graph"]["ops"])
    assert b["graph"]["reports"]["weight_only"]["bits"] == 4 and "half" in b["graph"]["reports"]
    contract = ExportedGraph.load(out)
    assert contract.dtype == "fp16" and {t.name: t.dtype for t in contract.outputs}["logits"] == "float32"
    assert _cpu_logits(out, "fp16").shape == (3, contract.model.vocab_size)
    with pytest.raises(EdgekitError, match="--graph-only"):
        from edgekit.runtimes.registry import get_runtime

        get_runtime("tensorrt").open(Engine.load(out))


def test_graph_only_fp16_for_ort_cuda_keeps_group_query_attention(exports, tmp_path):
    out = tmp_path / "cuda"
    engine = build_engine(exports["ort-cuda"], "l4", out, runtime="ort-cuda", precision="fp16", graph_only=True)
    assert "com.microsoft.GroupQueryAttention" in engine.details["graph"]["ops"]
    contract = ExportedGraph.load(out)
    assert {t.name: t.dtype for t in contract.inputs}["past_key_values.0.key"] == "float16"
    want = _cpu_logits(exports["ort-cuda"], None)
    got = _cpu_logits(out, "fp16")
    assert (got.argmax(-1) == want.argmax(-1)).all() and np.abs(got - want).max() < 0.05


def test_graph_only_hybrid_keeps_the_recurrent_state_fp32(exported, tmp_path):
    out = tmp_path / "hybrid"
    build_engine(exported("Qwen3_5ForCausalLM", "decomposed"), "l4", out, runtime="tensorrt", precision="fp16",
                 graph_only=True)
    dtypes = {t.name: t.dtype for t in ExportedGraph.load(out).inputs}
    recurrent = [d for name, d in dtypes.items() if name.startswith("past_recurrent.")]
    kv = [d for name, d in dtypes.items() if name.startswith("past_key_values.")]
    assert recurrent and set(recurrent) == {"float32"} and set(kv) == {"float16"}


def _quantized_matmuls(out):
    """The built graph, its initializers, each value's producer, and the MatMuls whose weight is dequantized."""
    import onnx

    proto = onnx.load(str(out / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    quantized = [n for n in proto.graph.node if n.op_type == "MatMul" and producer.get(n.input[1]) is not None
                 and producer[n.input[1]].op_type == "DequantizeLinear"]
    return proto, inits, producer, quantized


def test_graph_only_fp8_has_qdq_on_weights_and_activations(exports, tmp_path):
    from onnx import TensorProto

    out = tmp_path / "fp8"
    build_engine(exports["tensorrt"], "l4", out, runtime="tensorrt", precision="fp8", graph_only=True,
                 quant=QuantOptions(calibration=str(HELDOUT)))
    proto, inits, producer, quantized = _quantized_matmuls(out)
    assert len(quantized) == 14  # the LM head stays fp16 by default
    for node in quantized:
        assert inits[producer[node.input[1]].input[0]].data_type == TensorProto.FLOAT8E4M3FN
        assert producer[node.input[0]].op_type == "DequantizeLinear"  # the activation's Q/DQ pair
    # The build's own check sees a broken activation pair: a scale per channel instead of per tensor.
    from edgekit.engines.gpu_graph import GraphRecipe, check_graph

    recipe = GraphRecipe.from_dict({k: v for k, v in Engine.load(out).details["graph"].items()
                                    if k not in ("reports", "ops")})
    assert check_graph(proto, recipe, "tensorrt", "10.3") == []
    scale = inits[producer[quantized[0].input[0]].input[1]]
    scale.dims[:] = [1, 1]
    assert any("one per tensor" in problem for problem in check_graph(proto, recipe, "tensorrt", "10.3"))


def test_graph_only_tensorrt_int8_is_w8a8(exports, tmp_path):
    """TensorRT's INT8 is weights and activations: per-channel INT8 weights (DQ axis 1, no block),
    per-tensor INT8 activation Q/DQ, the SmoothQuant scale as a Mul before each group; runs on ORT CPU."""
    from onnx import TensorProto, helper

    out = tmp_path / "w8a8"
    engine = build_engine(exports["tensorrt"], "jetson-orin-nano-8gb", out, runtime="tensorrt", precision="int8",
                          graph_only=True, quant=QuantOptions(calibration=str(HELDOUT)))
    proto, inits, producer, quantized = _quantized_matmuls(out)
    assert len(quantized) == 14  # the LM head stays fp16 by default
    for node in quantized:
        weight_dq = producer[node.input[1]]
        attrs = {a.name: helper.get_attribute_value(a) for a in weight_dq.attribute}
        assert inits[weight_dq.input[0]].data_type == TensorProto.INT8 and attrs.get("axis") == 1
        assert not attrs.get("block_size")
        activation_dq = producer[node.input[0]]
        assert activation_dq.op_type == "DequantizeLinear" and producer[activation_dq.input[0]].op_type == "QuantizeLinear"
    assert engine.details["graph"]["method"] == "smoothquant" and "w8a8" in engine.details["graph"]["reports"]
    want = _cpu_logits(exports["tensorrt"], None)
    got = _cpu_logits(out, "fp16")
    assert np.isfinite(got).all() and np.abs(got - want).max() < 0.5


def test_tensorrt_networks_are_strongly_typed_where_the_bindings_can():
    from edgekit.runtimes.tensorrt import network_flags

    with_flag = types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace(STRONGLY_TYPED=1))
    assert network_flags(with_flag) == 1 << 1
    assert network_flags(types.SimpleNamespace(NetworkDefinitionCreationFlag=types.SimpleNamespace())) == 0


def test_graph_only_edges(exports, tmp_path):
    """A CPU profile has no GPU graph; fp32 on a GPU profile is the export's graph, copied as it is."""
    with pytest.raises(BuildRefused, match="--graph-only writes a GPU build's graph"):
        build_engine(exports["ort-cuda"], "cpu-x86-64", tmp_path / "x", graph_only=True)
    assert not (tmp_path / "x").exists()
    with pytest.raises(BuildRefused, match="measures a GPU precision's graph"):
        build_engine(exports["tensorrt"], "l4", tmp_path / "x", runtime="tensorrt", precision="fp32",
                     graph_only=True, quality_text=HELDOUT)
    same = build_engine(exports["tensorrt"], "l4", tmp_path / "fp32", runtime="tensorrt", precision="fp32",
                        graph_only=True)
    assert same.details["graph"] is None and same.details["graph_only"] is True
    assert (tmp_path / "fp32" / "model.onnx").read_bytes() == (exports["tensorrt"] / "model.onnx").read_bytes()


def _cpu_logits(folder, dtype: str | None) -> np.ndarray:
    """Logits of 3 tokens from ``folder``'s graph on ORT CPU (a GPU graph through cpu_runnable)."""
    import tempfile

    import onnx

    from edgekit.engines.gpu_graph import graph_contract, save_graph
    from edgekit.precision.half import cpu_runnable
    from edgekit.runtimes.onnxruntime import OrtSession

    graph = ExportedGraph.load(folder)
    if dtype is None:
        return OrtSession(graph).forward([1, 2, 3])
    proto = cpu_runnable(onnx.load(str(graph.model_path)), dtype)
    with tempfile.TemporaryDirectory() as tmp:
        save_graph(proto, Path(tmp) / "model.onnx")
        return OrtSession(graph_contract(graph, proto, Path(tmp), "model.onnx")).forward([1, 2, 3])


class _RecordingGpuRuntime:
    """A GPU runtime that records the graph it is handed instead of calling a vendor SDK."""

    names, device, extra, family = ("recording-gpu",), "gpu", "gpu", "recording"
    weight_quantization: tuple[str, ...] = ()
    kv_copies, strips_weights = 1, False

    def is_available(self):
        return None

    def check(self, graph, profile, precision):
        return []

    def plan(self, graph, profile, precision, options=None):
        return {}

    def requirements(self, profile):
        return {}

    def environment_problems(self, machine):
        return []

    def build(self, graph, plan, out):
        (out / "engine.bin").write_text(json.dumps({"parsed": str(graph.model_path), "dtype": graph.dtype,
                                                    "exists": graph.model_path.is_file()}))
        return {"model_file": "engine.bin"}


def test_the_runtime_gets_the_build_folders_graph(exports, tmp_path, monkeypatch):
    """A GPU build hands its runtime the GPU graph made in the build folder, not the export's file,
    and a full engine (not weight-stripped) does not ship the graph beside itself."""
    import edgekit.engines
    from edgekit.runtimes import registry

    monkeypatch.setitem(registry.runtimes(), "recording-gpu", _RecordingGpuRuntime())
    monkeypatch.setattr(edgekit.engines, "_check_environment", lambda plan: None)  # this machine has no GPU
    out = tmp_path / "built"
    engine = build_engine(exports["tensorrt"], "l4", out, runtime="recording-gpu", precision="int4")
    seen = json.loads((out / "engine.bin").read_text())
    parsed = Path(seen["parsed"])
    assert parsed.name == "model.onnx" and parsed.parent.name.startswith(".built.")  # the build's temporary folder
    assert seen["exists"] and seen["dtype"] == "fp16"
    assert not (out / "model.onnx").exists() and engine.details["graph_kept"] is False
    assert engine.details["graph"]["weights"] == "int4" and engine.graph.dtype == "fp16"
