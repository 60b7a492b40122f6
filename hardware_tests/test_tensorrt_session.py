"""Native TensorRT sessions on the GPU: build a plan, step it, compare with ONNX Runtime CPU on the same export.

Each test skips with what is missing here: TensorRT, cuda-python, the export stack (torch,
transformers, onnxscript) or ONNX Runtime for the reference. Plans are built for the chosen
profile with small shapes, so a build takes seconds.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

PROMPT = [3, 17, 42, 7, 99, 100, 5, 64, 12, 8, 250, 31, 77, 4, 9, 2, 11, 13, 21, 34]


@pytest.fixture(scope="session")
def plan_of(trt_profile, export_of, tmp_path_factory):
    """factory(preset, precision, strip=False) -> (export, graph, settings, plan path); each built once."""
    from edgekit.runtimes import tensorrt
    from edgekit.types import ExportedGraph

    made = {}

    def make(preset: str, precision: str, strip: bool = False, mtp: bool = False):
        if (preset, precision, strip, mtp) not in made:
            export = export_of(preset, mtp=mtp)
            graph = ExportedGraph.load(export)
            settings = tensorrt.plan_settings(graph, trt_profile, precision, strip_weights=strip)
            out = tmp_path_factory.mktemp("plan")
            settings = {**settings, **tensorrt.build(graph, settings, out)}
            made[(preset, precision, strip, mtp)] = export, graph, settings, out / settings["plan_file"]
        return made[(preset, precision, strip, mtp)]

    return make


def greedy(session, steps=24, forced=None):
    """Greedy tokens and each step's logits; ``forced`` feeds given tokens instead (teacher forcing)."""
    session.reset()
    rows, tokens = [session.last_logits(PROMPT)], []
    for i in range(steps):
        tokens.append(forced[i] if forced else int(np.argmax(rows[-1])))
        rows.append(session.last_logits([tokens[-1]]))
    return tokens, np.stack(rows)


def reference(export_dir):
    from edgekit.runtimes.onnxruntime import OrtSession
    from edgekit.types import ExportedGraph

    return greedy(OrtSession(ExportedGraph.load(export_dir)))


def assert_matches(session, export_dir, precision):
    tokens, rows = reference(export_dir)
    if precision == "fp32":
        got_tokens, got_rows = greedy(session)
        assert got_tokens == tokens
        np.testing.assert_allclose(got_rows, rows, atol=2e-3, rtol=2e-3)
    else:  # fp16 math drifts: feed ORT's tokens and compare step by step
        _, got_rows = greedy(session, forced=tokens)
        agree = np.mean(np.argmax(got_rows, -1) == np.argmax(rows, -1))
        assert agree >= 0.9, f"top-1 agrees on {agree:.0%} of steps"
        assert np.max(np.abs(got_rows - rows)) <= 0.05 * np.max(np.abs(rows)) + 0.05


def open_session(graph, settings, plan, folders=()):
    from edgekit.runtimes.tensorrt_session import TensorrtSession

    return TensorrtSession(graph, plan, settings, refit_folders=folders)


def test_cuda_buffers_round_trip(cuda_ready):
    from edgekit.runtimes.cuda_stream import CudaStream

    stream = CudaStream()
    try:
        free_before, _ = stream.memory()
        buffer = stream.allocate(64 << 20)
        assert stream.memory()[0] <= free_before - (64 << 20)
        data = np.arange(1000, dtype=np.float32)
        stream.upload(buffer, data)
        back = np.empty(10, dtype=np.float32)
        stream.download(buffer, 990 * 4, back)
        np.testing.assert_array_equal(back, data[990:])
        stream.zero(buffer, 4000)
        stream.download(buffer, 0, back)
        assert not back.any()
    finally:
        stream.close()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_decomposed_plan_matches_ort_cpu(plan_of, precision):
    from edgekit.runtimes.cuda_stream import CudaStream

    export, graph, settings, plan = plan_of("tiny-qwen3", precision)

    probe = CudaStream()
    free_before, _ = probe.memory()
    session = open_session(graph, settings, plan)
    try:
        assert probe.memory()[0] <= free_before - session.plan.total_bytes  # the buffers are on the GPU
        assert session.device_bytes() > session.plan.total_bytes and session.describe().startswith("TensorRT")
        assert_matches(session, export, precision)
    finally:
        session.close()
        probe.close()


def test_hybrid_plan_matches_ort_cpu(plan_of):
    export, graph, settings, plan = plan_of("tiny-qwen3.5", "fp32")
    session = open_session(graph, settings, plan)
    try:
        assert any(b.role == "recurrent" for b in session.plan.buffers)
        assert_matches(session, export, "fp32")
    finally:
        session.close()


def test_a_plan_with_the_mtp_head_speculates_as_plain_greedy(plan_of):
    """export --mtp on TensorRT: the plan's mtp_logits rows propose, and greedy output is plain decoding's."""
    from edgekit.generate import generate
    from edgekit.speculative import generate_speculative
    from edgekit.speculative.mtp import open_mtp

    export, graph, settings, plan = plan_of("tiny-code-mtp", "fp32", mtp=True)
    session = open_session(graph, settings, plan)
    try:
        plain = generate(session, PROMPT, 24).token_ids
        result = generate_speculative(session, PROMPT, 24, open_mtp(session), 1)
        assert result.token_ids == plain and result.proposed > 0 and result.rounds < 23
    finally:
        session.close()


def test_weight_stripped_plan_refits_and_matches(plan_of):
    from edgekit.errors import ArtifactError

    export, graph, settings, plan = plan_of("tiny-qwen3", "fp32", strip=True)
    full = plan_of("tiny-qwen3", "fp32")[3]
    assert settings["strip_weights"] and plan.stat().st_size < full.stat().st_size
    with pytest.raises(ArtifactError):
        open_session(graph, settings, plan)  # no ONNX beside the plan and no folder given
    session = open_session(graph, settings, plan, folders=(export,))
    try:
        assert session.refitted
        assert_matches(session, export, "fp32")
    finally:
        session.close()


def test_decode_bench(plan_of):
    _, graph, settings, plan = plan_of("tiny-qwen3", "fp16")
    session = open_session(graph, settings, plan)
    try:
        session.last_logits(PROMPT)  # warm-up
        session.reset()
        start = time.perf_counter()
        logits = session.last_logits(PROMPT)
        ttft = time.perf_counter() - start
        steps = []
        for _ in range(32):
            start = time.perf_counter()
            logits = session.last_logits([int(np.argmax(logits))])
            steps.append(time.perf_counter() - start)
        tpot = np.percentile(steps, [50, 90])
        print(f"\n{session.describe()}: TTFT {ttft * 1e3:.2f} ms ({len(PROMPT)} tokens), "
              f"TPOT p50 {tpot[0] * 1e3:.2f} ms, p90 {tpot[1] * 1e3:.2f} ms")
        assert session.length == len(PROMPT) + 32 and np.isfinite(logits).all()
    finally:
        session.close()
