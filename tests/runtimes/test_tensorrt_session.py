"""The TensorRT session's stepping logic, on CPU: the real PlanSession on the real exported graph.

Only the vendor calls are swapped: ``OrtExecutor`` runs the exact ONNX graph TensorRT would get on
ONNX Runtime CPU, with NumPy byte arrays standing in for device buffers, and it holds the session to
TensorRT's rules (every input shape set, no input aliasing an output, buffers large enough).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from edgekit.errors import ArtifactError
from edgekit.profiles import ShapeRange, load_profile
from edgekit.runtimes import tensorrt
from edgekit.runtimes.onnxruntime import OrtSession
from edgekit.runtimes.tensorrt_session import PlanSession, buffer_plan, refit_source, step_shapes
from edgekit.types import ExportedGraph, state_io

ORT_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16", "tensor(bfloat16)": "bfloat16",
             "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(bool)": "bool"}
GRAPHS = [("Qwen3ForCausalLM", "portable", "fp32"), ("Qwen3ForCausalLM", "decomposed", "fp32"),
          ("Qwen3_5ForCausalLM", "portable", "fp32"), ("Qwen3_5ForCausalLM", "decomposed", "fp32"),
          ("Qwen3ForCausalLM", "decomposed", "fp16")]
PROMPT = [3, 17, 42, 7, 99, 100, 5, 64, 12, 8, 250, 31, 77]  # 13 tokens: two prefill chunks of at most 8


class OrtExecutor:
    """TrtExecutor's calls on ONNX Runtime CPU; records what crosses the "PCIe" boundary."""

    def __init__(self, model_path):
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.types = {t.name: ORT_TYPES[t.type] for t in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.shapes, self.addresses = {}, {}
        self.uploaded, self.downloaded = [], []
        self.closed = False

    def tensor_dtype(self, name):
        return self.types[name]

    def allocate(self, nbytes):
        return np.full(nbytes, 0x7F, dtype=np.uint8)  # garbage (3.4e38 as float32): unset state shows

    def upload(self, buffer, array):
        data = np.ascontiguousarray(array).view(np.uint8).reshape(-1)
        buffer[: data.size] = data
        self.uploaded.append(data.size)

    def zero(self, buffer, nbytes):
        buffer[:nbytes] = 0

    def download(self, buffer, offset, out):
        out.view(np.uint8).reshape(-1)[:] = buffer[offset: offset + out.nbytes]
        self.downloaded.append(out.nbytes)

    def set_input_shape(self, name, shape):
        assert name in self.inputs, name
        self.shapes[name] = tuple(shape)

    def set_tensor_address(self, name, buffer):
        self.addresses[name] = buffer

    def execute(self):
        feeds = {}
        for name in self.inputs:
            buffer, shape = self.addresses[name], self.shapes[name]
            nbytes = math.prod(shape) * np.dtype(self._np(name)).itemsize
            assert nbytes <= buffer.size, f"{name} {shape} overflows its buffer"
            feeds[name] = buffer[:nbytes].view(self._np(name)).reshape(shape).copy()
        for out in self.outputs:  # TensorRT: an output may not alias an input
            assert not any(self.addresses[out] is self.addresses[name] for name in self.inputs), out
        for name, value in zip(self.outputs, self.session.run(self.outputs, feeds)):
            data = np.ascontiguousarray(value).view(np.uint8).reshape(-1)
            assert data.size <= self.addresses[name].size, f"{name} {value.shape} overflows its buffer"
            self.addresses[name][: data.size] = data

    def _np(self, name):
        return np.uint16 if self.types[name] == "bfloat16" else self.types[name]

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def small_profile():
    """The L4 profile with shapes small enough to exercise chunked prefill and the context limit."""
    profile = load_profile("l4")
    shapes = {"batch": ShapeRange(1, 1, 1), "prompt": ShapeRange(1, 4, 8), "context": ShapeRange(1, 32, 48)}
    return dataclasses.replace(profile, shapes=shapes)


def open_plan(export_dir, profile, engine_from=None, logits_budget=None):
    graph = ExportedGraph.load(export_dir)
    plan = buffer_plan(graph, tensorrt.shape_profile(graph, profile), logits_budget)
    executor = OrtExecutor(ExportedGraph.load(engine_from or export_dir).model_path)
    return PlanSession(graph, plan, executor, "ONNX Runtime CPU as TensorRT"), executor


def greedy(session, steps=12):
    session.reset()
    rows = [session.last_logits(PROMPT)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(rows[-1])))
        rows.append(session.last_logits([tokens[-1]]))
    return tokens, np.stack(rows)


@pytest.mark.parametrize("arch,target,dtype", GRAPHS)
def test_greedy_parity_with_ort_session(exported, small_profile, arch, target, dtype):
    path = exported(arch, target, dtype)
    session, _ = open_plan(path, small_profile)
    tokens, rows = greedy(session)
    expected_tokens, expected_rows = greedy(OrtSession(ExportedGraph.load(path)))
    assert tokens == expected_tokens
    np.testing.assert_allclose(rows, expected_rows, atol=1e-4 if dtype == "fp32" else 1e-2, rtol=1e-3)
    assert session.length == len(PROMPT) + len(tokens) and rows.dtype == np.float32


@pytest.mark.parametrize("arch,target,dtype", GRAPHS[1:4:2])
def test_forward_returns_every_row_across_chunks(exported, small_profile, arch, target, dtype):
    path = exported(arch, target, dtype)
    session, _ = open_plan(path, small_profile)
    reference = OrtSession(ExportedGraph.load(path))
    np.testing.assert_allclose(session.forward(PROMPT), reference.forward(PROMPT), atol=1e-4, rtol=1e-3)
    np.testing.assert_allclose(session.forward([5, 6]), reference.forward([5, 6]), atol=1e-4, rtol=1e-3)


def test_the_logits_budget_bounds_the_prefill_chunk(exported, small_profile):
    path = exported("Qwen3ForCausalLM", "portable")
    vocab = ExportedGraph.load(path).model.vocab_size
    session, executor = open_plan(path, small_profile, logits_budget=3 * vocab * 4)
    assert session.plan.prompt == 3 and session.plan.get("logits").shape == (1, 3, vocab)
    reference = OrtSession(ExportedGraph.load(path))
    np.testing.assert_allclose(session.forward(PROMPT), reference.forward(PROMPT), atol=1e-4, rtol=1e-3)
    assert len(executor.downloaded) == 5  # 13 tokens in chunks of 3, 3, 3, 3, 1


def test_only_ids_go_in_and_one_row_comes_out(exported, small_profile):
    session, executor = open_plan(exported("Qwen3_5ForCausalLM", "decomposed"), small_profile)
    vocab = session.plan.get("logits").shape[-1]
    session.last_logits(PROMPT)
    executor.uploaded.clear(), executor.downloaded.clear()
    session.last_logits([9])
    assert executor.uploaded == [8] and executor.downloaded == [vocab * 4]  # one int64 id; one float32 row


def test_reset_clears_the_recurrent_and_conv_states(exported, small_profile):
    session, _ = open_plan(exported("Qwen3_5ForCausalLM", "decomposed"), small_profile)
    first = greedy(session, steps=3)
    again = greedy(session, steps=3)  # greedy() resets: a state left over would change the logits
    assert first[0] == again[0]
    np.testing.assert_array_equal(first[1], again[1])


def test_context_limit_is_refused_before_any_step(exported, small_profile):
    path = exported("Qwen3ForCausalLM", "decomposed")
    session, _ = open_plan(path, small_profile)
    reference = OrtSession(ExportedGraph.load(path))
    filler = list(range(1, 47))  # 46 of the plan's 48 positions
    session.forward(filler), reference.forward(filler)
    with pytest.raises(ArtifactError):
        session.last_logits([1, 2, 3])
    assert session.length == 46
    np.testing.assert_allclose(session.last_logits([1, 2]), reference.last_logits([1, 2]), atol=1e-4, rtol=1e-3)
    assert session.length == 48  # the buffers hold the ShapeProfile's max context, exactly


def test_buffer_plan_against_the_memory_estimate(exported):
    from edgekit.engines.plan import fit_positions, memory_estimate

    graph = ExportedGraph.load(exported("Qwen3_5ForCausalLM", "decomposed"))
    profile, _ = fit_positions(graph, load_profile("l4"))
    plan = buffer_plan(graph, tensorrt.shape_profile(graph, profile))
    from edgekit.runtimes.registry import get_runtime

    estimate = memory_estimate(graph, profile, "fp32", kv_copies=get_runtime("tensorrt").kv_copies)
    # The plan's estimate counts the runtime's two ping-pong copies per batch row; the session holds batch 1.
    assert plan.state_bytes == estimate["kv_cache_bytes"] // estimate["batch"]
    prompt, context, vocab = plan.prompt, plan.context, graph.model.vocab_size
    assert (prompt, context) == (profile.shapes["prompt"].max, profile.shapes["context"].max)
    assert plan.total_bytes == plan.state_bytes + 8 * prompt + 8 * context + 4 * prompt * vocab
    attention = next(layer for layer in graph.layers if layer.has_kv)
    key = plan.get(f"past_key_values.{attention.index}.key")
    assert key.shape == (1, attention.num_kv_heads, context, attention.head_dim) and key.copies == 2
    assert plan.to_dict()["total_bytes"] == plan.total_bytes


def test_step_shapes_grow_the_past_and_keep_fixed_states(exported):
    graph = ExportedGraph.load(exported("Qwen3_5ForCausalLM", "decomposed"))
    first, later = step_shapes(graph, 0, 5), step_shapes(graph, 5, 1)
    assert set(first) == {t.name for t in graph.inputs}
    assert first["input_ids"] == (1, 5) and later["input_ids"] == (1, 1) and later["attention_mask"] == (1, 6)
    for io in state_io(graph.layers):
        if io.layer.has_kv:
            assert first[io.past][2] == 0 and later[io.past][2] == 5
        else:
            assert first[io.past] == later[io.past] == (1, *io.layer.states[io.part])


def test_strip_weights_is_recorded_and_its_onnx_found(exported, small_profile, tmp_path):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "decomposed"))
    full = tensorrt.plan_settings(graph, small_profile, "fp16")
    stripped = tensorrt.plan_settings(graph, small_profile, "fp16", strip_weights=True)
    assert full["strip_weights"] is False and full["refit_from"] is None
    assert stripped["strip_weights"] is True and stripped["refit_from"] == graph.model_file
    plan = tmp_path / "build" / "model.plan"
    plan.parent.mkdir()
    assert refit_source(plan, full) is None
    assert refit_source(plan, stripped, (graph.path,)) == graph.model_path
    with pytest.raises(ArtifactError):
        refit_source(plan, stripped)  # neither beside the plan nor in a folder given
    (plan.parent / graph.model_file).write_bytes(b"")
    assert refit_source(plan, stripped) == plan.parent / graph.model_file


def test_an_engine_from_another_export_is_refused(exported, small_profile):
    fp16 = exported("Qwen3ForCausalLM", "decomposed", "fp16")
    with pytest.raises(ArtifactError):  # its KV and logits are float32 where this export says float16
        open_plan(fp16, small_profile, engine_from=exported("Qwen3ForCausalLM", "decomposed"))
