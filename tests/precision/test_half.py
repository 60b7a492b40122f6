"""fp16 / bf16 graphs (edgekit.precision.half): the strongly typed structure on every target, the
fp32 islands, quantized inputs, numerics through ONNX Runtime CPU against the fp32 graph on Qwen3,
Llama and Qwen3.5 (hybrid), and quality on tiny-code's whole held-out text."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto

from edgekit.errors import EdgekitError, InternalError
from edgekit.precision.half import convert_to_half, cpu_runnable, element_types
from edgekit.types import ExportedGraph

HALF = {"fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}
FLOAT = TensorProto.FLOAT
TARGETS = ("ort", "portable", "decomposed")
# Relative logits error allowed against fp32 on random-weight models: ~60 units of the type's rounding.
REL_TOL = {"fp16": 0.03, "bf16": 0.24}


def _converted(folder, dtype: str, keep=None):
    graph = ExportedGraph.load(folder)
    proto = onnx.load(str(graph.model_path))
    return graph, proto, convert_to_half(proto, dtype, keep=keep)


def _producers(proto) -> dict:
    return {out: node for node in proto.graph.node for out in node.output}


def _lm_head(proto):
    """The MatMul whose output, through the converter's Cast, is `logits`."""
    cast = _producers(proto)["logits"]
    assert cast.op_type == "Cast" and cast.attribute[0].i == FLOAT
    head = _producers(proto)[cast.input[0]]
    assert head.op_type == "MatMul"
    return head


def _inputs_of(proto, op_type: str, types: dict) -> list[int]:
    return [types[n.input[0]] for n in proto.graph.node if n.op_type == op_type]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("target", TARGETS)
def test_weights_matmuls_and_io_are_half(tiny_code_export, target, dtype):
    _, proto, report = _converted(tiny_code_export(target), dtype)
    half, types = HALF[dtype], element_types(proto.graph)
    head = _lm_head(proto)
    head_type = TensorProto.FLOAT16  # bf16 graphs run the LM head in fp16 (measured: docs/precisions.md ("fp16 / bf16 islands"))
    for node in proto.graph.node:
        if node.op_type == "MatMul":
            want = head_type if node is head else half
            assert [types[i] for i in node.input] == [want, want], node.name
    for init in proto.graph.initializer:
        if init.data_type not in (FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16) or len(init.dims) < 2:
            continue
        rotary = init.name.startswith(("cos_", "sin_"))
        if rotary:  # GroupQueryAttention wants its tables in q's type; elsewhere the rotation is an fp32 island
            assert init.data_type == (half if target == "ort" else FLOAT), init.name
        else:
            assert init.data_type in (half, head_type), init.name
    assert all(v.type.tensor_type.elem_type == half for v in proto.graph.input if v.name.startswith("past_"))
    assert all(v.type.tensor_type.elem_type == half for v in proto.graph.output if v.name.startswith("present"))
    assert {v.name: v.type.tensor_type.elem_type for v in proto.graph.input}["input_ids"] == TensorProto.INT64
    assert proto.graph.output[0].name == "logits" and proto.graph.output[0].type.tensor_type.elem_type == FLOAT
    assert report["weights_bytes_after"] < 0.6 * report["weights_bytes_before"]
    assert report["dtype"] == dtype and report["casts_inserted"] >= 1 and "logits" in report["kept_fp32"]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("target", ["portable", "decomposed"])
def test_standard_graphs_check_and_infer(tiny_code_export, target, dtype):
    """onnx.checker (full) passes and ONNX's own type inference agrees with every type the pass assigned."""
    _, proto, _ = _converted(tiny_code_export(target), dtype)
    onnx.checker.check_model(proto, full_check=True)
    inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True, check_type=True)
    declared = {v.name: v.type.tensor_type for v in [*inferred.graph.value_info, *inferred.graph.output]}
    ours = element_types(proto.graph)
    for node in proto.graph.node:
        for out in node.output:
            assert out in declared, f"{out} has no inferred type"
            assert declared[out].elem_type == ours[out], out
            if node.op_type not in ("Constant",):
                assert declared[out].HasField("shape"), f"{out} has no inferred shape"


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_islands_are_fp32_per_op(tiny_code_export, dtype):
    """Decomposed: norm statistics, softmax and rotary in fp32; portable: RotaryEmbedding fp32, fused
    norms half with fp32 statistics, Attention with softmax_precision=1; ort: the fused ops half."""
    half = HALF[dtype]
    _, dec, report = _converted(tiny_code_export("decomposed"), dtype)
    types = element_types(dec.graph)
    assert set(_inputs_of(dec, "ReduceMean", types)) == {FLOAT}
    assert set(_inputs_of(dec, "Softmax", types)) == {FLOAT}
    assert {"norm_statistics", "softmax", "rotary"} <= set(report["kept_fp32"])
    tables = [n for n in dec.graph.node if n.op_type == "Gather" and n.input[0].startswith("cos_")]
    assert tables and all(types[n.output[0]] == FLOAT for n in tables)

    _, por, _ = _converted(tiny_code_export("portable"), dtype)
    types = element_types(por.graph)
    assert set(_inputs_of(por, "RotaryEmbedding", types)) == {FLOAT}
    assert set(_inputs_of(por, "RMSNormalization", types)) == {half}
    for node in por.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        if node.op_type == "Attention":
            assert attrs["softmax_precision"] == FLOAT and types[node.input[0]] == half
        if node.op_type == "RMSNormalization":
            assert attrs["stash_type"] == 1

    _, ort_graph, _ = _converted(tiny_code_export("ort"), dtype)
    types = element_types(ort_graph.graph)
    assert set(_inputs_of(ort_graph, "GroupQueryAttention", types)) == {half}
    assert set(_inputs_of(ort_graph, "SkipSimplifiedLayerNormalization", types)) == {half}


def test_without_islands_nothing_stays_fp32(tiny_code_export):
    """keep=() converts every float op: the islands are chosen per op, not a blanket rule."""
    _, proto, report = _converted(tiny_code_export("decomposed"), "fp16", keep=())
    types = element_types(proto.graph)
    fp32 = [out for n in proto.graph.node for out in n.output if types.get(out) == FLOAT and out != "logits"]
    assert fp32 == [] and report["kept_fp32"] == {}
    onnx.checker.check_model(proto, full_check=True)


def test_bf16_emulation_rounds_every_tensor(tiny_code_export, islands):
    """cpu_runnable: fp16 is the graph itself; bf16 has no bf16 tensor left and every present it
    returns holds bf16 values exactly (rounded after the op that made it)."""
    graph, proto, _ = _converted(tiny_code_export("decomposed"), "bf16")
    _, proto16, _ = _converted(tiny_code_export("decomposed"), "fp16")
    assert cpu_runnable(proto16, "fp16").SerializeToString() == proto16.SerializeToString()
    emulated = cpu_runnable(proto, "bf16")
    assert proto.graph.input[2].type.tensor_type.elem_type == TensorProto.BFLOAT16  # the input is untouched
    bf16, types = TensorProto.BFLOAT16, element_types(emulated.graph)
    assert all(t.data_type != bf16 for t in emulated.graph.initializer)
    assert all(v.type.tensor_type.elem_type != bf16 for v in [*emulated.graph.input, *emulated.graph.output])
    rounding = 0
    for node in emulated.graph.node:  # bf16 lives only between a rounding Cast and the Cast back to fp32
        if any(types.get(i) == bf16 for i in node.input):
            assert node.op_type == "Cast" and node.attribute[0].i == FLOAT, node.name
        if any(types.get(o) == bf16 for o in node.output):
            assert node.op_type == "Cast", node.name
            rounding += 1
    assert rounding > 100
    session = islands.ProtoSession(emulated, graph.layers)
    session.forward(list(range(3, 40)))
    for value in session.past.values():
        assert value.dtype == np.float32 and value.size
        assert np.array_equal(value, value.astype(ml_dtypes.bfloat16).astype(np.float32))


FAMILIES = [("Qwen3ForCausalLM", "ort"), ("LlamaForCausalLM", "ort"),
            ("Qwen3_5ForCausalLM", "ort"), ("Qwen3_5ForCausalLM", "decomposed")]


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("arch,target", FAMILIES)
def test_numerics_against_fp32(exported, islands, arch, target, dtype):
    """Prefill 16 tokens, then decode 8 one by one (caches fed back in half, recurrent state fp32)."""
    graph = ExportedGraph.load(exported(arch, target))
    reference = islands.ProtoSession(onnx.load(str(graph.model_path)), graph.layers)
    proto = onnx.load(str(graph.model_path))
    convert_to_half(proto, dtype)
    if any(layer.kind == "linear_attention" for layer in graph.layers):
        recurrent = [v for v in proto.graph.input if v.name.startswith("past_recurrent.")]
        assert recurrent and all(v.type.tensor_type.elem_type == FLOAT for v in recurrent)
    half = islands.ProtoSession(cpu_runnable(proto, dtype), graph.layers)
    ids = np.random.default_rng(0).integers(3, graph.model.vocab_size, 24).tolist()
    got, want = [half.forward(ids[:16])], [reference.forward(ids[:16])]
    for token in ids[16:]:
        got.append(half.forward([token]))
        want.append(reference.forward([token]))
    got, want = np.concatenate(got), np.concatenate(want)  # (24, vocab)
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < rel <= REL_TOL[dtype], rel  # > 0: the half graph really ran in half
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.75


@pytest.fixture(scope="module")
def references(tiny_code_export, islands):
    """target -> the fp32 tiny-code graph's session (one per target for the module)."""
    made = {}

    def make(target):
        if target not in made:
            graph = ExportedGraph.load(tiny_code_export(target))
            made[target] = islands.ProtoSession(onnx.load(str(graph.model_path)), graph.layers)
        return made[target]

    return make


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("target", TARGETS)
def test_quality_on_heldout_text(tiny_code_export, islands, references, target, dtype):
    """The whole held-out text in windows of the model's 1024 positions: top-1 >= 0.99, perplexity within 0.5%."""
    graph, proto, _ = _converted(tiny_code_export(target), dtype)
    ids = islands.heldout_ids(graph)
    half = islands.ProtoSession(cpu_runnable(proto, dtype), graph.layers)
    figures = islands.compare(half, references(target), ids, window=graph.model.max_position_embeddings)
    windows = -(-len(ids) // graph.model.max_position_embeddings)
    assert figures["tokens"] == len(ids) - windows  # every token predicted, the whole text
    assert figures["top1_agreement"] >= 0.99, figures
    assert abs(figures["perplexity_increase"]) <= 0.005, figures
    assert figures["max_abs_logit_diff"] > 0


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_weight_only_qdq_scales_become_half(tiny_code_export, islands, dtype):
    """int4 Q/DQ weights (the qdq pass's output, LM head and embeddings too): scales and DequantizeLinear
    outputs in half, each DQ feeding its MatMul directly (TensorRT fuses that pair), graph checks, runs."""
    from edgekit.precision.weight_only import WeightOnlySettings, quantize_weight_only

    graph = ExportedGraph.load(tiny_code_export("portable"))
    quantized = onnx.load(str(graph.model_path))
    quantize_weight_only(quantized, WeightOnlySettings(bits=4, block_size=32, embeddings=True))
    proto = onnx.ModelProto()
    proto.CopyFrom(quantized)
    convert_to_half(proto, dtype)
    types, inits, made = element_types(proto.graph), {t.name: t for t in proto.graph.initializer}, _producers(proto)
    dqs = [n for n in proto.graph.node if n.op_type == "DequantizeLinear"]
    assert dqs and all(inits[n.input[1]].data_type == HALF[dtype] for n in dqs)
    assert all(inits[n.input[0]].data_type == TensorProto.INT4 for n in dqs)
    assert all(types[n.output[0]] == HALF[dtype] for n in dqs)
    matmuls = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] not in inits]
    weighted = [n for n in matmuls if n.input[1] in made and made[n.input[1]].op_type != "Transpose"]
    assert len(weighted) == 29 and all(made[n.input[1]].op_type == "DequantizeLinear" for n in weighted)
    onnx.checker.check_model(proto, full_check=True)
    _close_on_text(islands, graph, cpu_runnable(proto, dtype), quantized)


def test_matmulnbits_scales_become_half(tiny_code_export, islands):
    """ONNX Runtime's MatMulNBits and GatherBlockQuantized (the ort target's int4): fp16 scales, runs on ORT CPU."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    graph = ExportedGraph.load(tiny_code_export("ort"))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(graph.model_path)), block_size=32, is_symmetric=True,
                                     op_types_to_quantize=("MatMul", "Gather"),
                                     quant_axes=(("MatMul", 0), ("Gather", 1)))
    quantizer.process()
    quantized = quantizer.model.model
    proto = onnx.ModelProto()
    proto.CopyFrom(quantized)
    convert_to_half(proto, "fp16")
    inits = {t.name: t for t in proto.graph.initializer}
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(inits[n.input[2]].data_type == TensorProto.FLOAT16 for n in nbits)
    types = element_types(proto.graph)
    assert types[nbits[0].input[0]] == TensorProto.FLOAT16
    gathers = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert gathers and all(inits[n.input[2]].data_type == TensorProto.FLOAT16 for n in gathers)
    assert all(types[n.output[0]] == TensorProto.FLOAT16 for n in gathers)
    _close_on_text(islands, graph, proto, quantized)


def _close_on_text(islands, graph, half_proto, fp32_proto) -> None:
    """The half graph agrees with the same quantized graph in fp32 on the first held-out window."""
    ids = islands.heldout_ids(graph)[:256]
    figures = islands.compare(islands.ProtoSession(half_proto, graph.layers),
                              islands.ProtoSession(fp32_proto, graph.layers), ids, window=256)
    assert figures["top1_agreement"] >= 0.97 and abs(figures["perplexity_increase"]) <= 0.01, figures


def test_refuses_other_dtypes_and_unloaded_weights(tiny_code_export):
    graph = ExportedGraph.load(tiny_code_export("portable"))
    with pytest.raises(EdgekitError, match="fp16, bf16"):
        convert_to_half(onnx.load(str(graph.model_path)), "int8")
    converted = onnx.load(str(graph.model_path))
    convert_to_half(converted, "fp16")
    with pytest.raises(EdgekitError, match="already holds half weights"):
        convert_to_half(converted, "bf16")
    with pytest.raises(InternalError, match="external"):
        convert_to_half(onnx.load(str(graph.model_path), load_external_data=False), "fp16")
