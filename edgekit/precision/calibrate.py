"""Calibration for AWQ and fp8, and quality of one ONNX graph against another, both on ONNX Runtime CPU.

    text ─export's tokenizer→ windows of `window` tokens (each run with an empty cache)
         ─fp32 graph + every constant-weight MatMul's input as an extra output (ORT CPU)→ per MatMul:
              row MEAN_ABS  mean |x| per input channel     (AWQ's s = mean|x|^alpha)
              row AMAX      max |x| per input channel      (fp8: per-tensor scale = max over channels / 448)
              rows SAMPLES  up to `rows` activation rows     (AWQ's output-error search)

``compare_graphs`` scores one ONNX graph against another on ORT CPU with
``edgekit.quality.score_sessions``: both teacher-forced on the whole text in windows, perplexity
of each, top-1 agreement, KL(reference ‖ candidate) (fp32 export vs a quantized graph, same I/O).
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.quality import (
    MAX_PERPLEXITY_INCREASE,
    MIN_TOP1_AGREEMENT,
    QualityReport,
    score_sessions,
    text_token_ids,
)
from edgekit.types import ExportedGraph

MEAN_ABS, AMAX, SAMPLES = 0, 1, slice(2, None)  # rows of each matmul_input_stats value
SAMPLE_ROWS = 512
NUMPY_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
               "tensor(int32)": np.int32}


def calibration_windows(graph: ExportedGraph, text_file: str | Path, window: int = 128, samples: int = 8) -> list[list[int]]:
    """The first ``samples`` full windows of ``window`` tokens of ``text_file``, tokenized with the export's tokenizer."""
    from edgekit.tokenizer import load_tokenizer

    path = Path(text_file)
    if not path.is_file():
        raise EdgekitError(f"--calibration {text_file}: no such file",
                           "pass a UTF-8 text like the model's use (a few KB), e.g. the preset's calibration.txt")
    ids = load_tokenizer(graph, required=True).encode(path.read_text(encoding="utf-8", errors="replace"))
    windows = [ids[i:i + window] for i in range(0, len(ids) - window + 1, window)][:samples]
    if not windows:
        raise EdgekitError(f"--calibration {text_file} has {len(ids)} tokens, under one window of {window}",
                           "pass a longer calibration text (a few KB)")
    return windows


def matmul_input_stats(model, graph: ExportedGraph, windows: Iterable[list[int]],
                       rows: int = SAMPLE_ROWS) -> dict[str, np.ndarray]:
    """Per MatMul node name (with a constant 2-D weight): statistics of its activation input x,
    gathered by running the fp32 graph ``model`` (a path, or a ModelProto holding its weights) on
    ORT CPU over ``windows``, each with an empty cache.

    Each value is float32 (2 + R, K): row ``MEAN_ABS`` = mean |x| per input channel over every
    token, row ``AMAX`` = max |x| per channel, rows ``SAMPLES`` = R <= ``rows`` rows of x (evenly
    spaced tokens of each window). MatMuls reading the same tensor share one array.
    """
    import onnx

    proto = onnx.load(str(model), load_external_data=False) if isinstance(model, (str, Path)) else model
    consumers = _constant_matmul_inputs(proto)  # tensor -> node names
    session = _open(model, outputs=list(consumers))
    windows = list(windows)
    per_window = max(1, rows // max(1, len(windows)))
    sums, peaks, picked, count = {}, {}, {n: [] for n in consumers}, 0
    for ids in windows:
        for name, x in zip(consumers, session.run(list(consumers), _feed(session, graph, ids))):
            flat = x.reshape(-1, x.shape[-1])  # (tokens, K)
            sums[name] = sums.get(name, 0) + np.abs(flat).sum(0, dtype=np.float64)
            peaks[name] = np.maximum(peaks.get(name, 0), np.abs(flat).max(0))
            picked[name].append(flat[np.linspace(0, len(flat) - 1, min(per_window, len(flat))).astype(int)])
        count += len(ids)
    stats = {}
    for name, nodes in consumers.items():
        value = np.concatenate([(sums[name] / count)[None], peaks[name][None], *picked[name]]).astype(np.float32)
        stats.update(dict.fromkeys(nodes, value))
    return stats


def compare_graphs(reference, candidate, graph: ExportedGraph, text_file: str | Path, window: int | None = None,
                   accuracy_level: int = 0, exact_qdq: bool = True, max_perplexity_increase: float = MAX_PERPLEXITY_INCREASE,
                   min_top1: float = MIN_TOP1_AGREEMENT) -> QualityReport:
    """Quality of ONNX graph ``candidate`` against ``reference`` (each a path or a ModelProto, with
    the export's I/O) on the WHOLE of ``text_file``, in windows of ``window`` tokens (default: the
    model's positions), teacher-forced from an empty cache; scored by ``quality.score_sessions``.

    ``exact_qdq`` (default) runs every QuantizeLinear / DequantizeLinear as written, in fp32: the
    graph's own arithmetic, which a GPU computes up to its accumulation order. Without it ORT CPU
    fuses them into its kernels: DequantizeLinear + MatMul into MatMulNBits, computing in
    ``accuracy_level`` (0: fp32 activations; 4, ORT's default: int8), and INT8 Q/DQ into
    MatMulIntegerToFloat, whose AVX2 (non-VNNI) kernel saturates int16 pair sums (u8·s8
    ``pmaddubsw``), an error of this CPU that TensorRT's int32-accumulating INT8 does not make.
    """
    ids = text_token_ids(graph, text_file, None)
    window = window or graph.model.max_position_embeddings
    ref, cand = (_Scorer(_open(m, accuracy_level, exact_qdq=exact_qdq), graph) for m in (reference, candidate))
    report = score_sessions(cand, ref, ids, window, str(text_file))
    passed = report.perplexity_increase <= max_perplexity_increase and report.top1_agreement >= min_top1
    return dataclasses.replace(report, passed=bool(passed))


class _Scorer:
    """An ONNX Runtime session as ``score_sessions`` wants it: ``reset``, then ``forward(ids)`` →
    (S, vocab) logits from an empty cache."""

    def __init__(self, session, graph: ExportedGraph):
        self.session, self.graph = session, graph

    def reset(self, capacity: int) -> None:
        """Nothing to do: every forward starts from an empty cache."""

    def forward(self, ids: list[int]) -> np.ndarray:
        return self.session.run(["logits"], _feed(self.session, self.graph, ids))[0][0]  # (S, vocab)


def _constant_matmul_inputs(proto) -> dict[str, list[str]]:
    from edgekit.precision.weight_only import _constant_weight

    inits = {t.name: t for t in proto.graph.initializer}
    consumers: dict[str, list[str]] = {}
    for node in proto.graph.node:
        if _constant_weight(node, inits):
            consumers.setdefault(node.input[0], []).append(node.name)
    return consumers


def _open(model, accuracy_level: int = 0, outputs: list[str] = (), exact_qdq: bool = False):
    """An ORT CPU session on ``model`` with ``outputs`` added as graph outputs (``exact_qdq``: no Q/DQ fusion).

    A path is read without its weights, which ONNX Runtime then reads from the model's folder, so
    a multi-GB export is never serialized; a ModelProto over protobuf's 2 GB is saved to a temporary
    folder first (ORT reads the data while the session is made).
    """
    import onnx
    import onnxruntime as ort

    folder = None
    if isinstance(model, (str, Path)):
        model, folder = onnx.load(str(model), load_external_data=False), str(Path(model).parent)
    elif model.ByteSize() > 2**31 - 2**24:
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save_model(model, f"{tmp}/model.onnx", save_as_external_data=True, location="model.onnx.data")
            return _open(Path(tmp) / "model.onnx", accuracy_level, outputs, exact_qdq)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if exact_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    if folder is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    added = [name for name in outputs if name not in {o.name for o in model.graph.output}]
    for name in added:
        model.graph.output.add().name = name
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    finally:  # the caller's proto is left as it was
        del model.graph.output[len(model.graph.output) - len(added):]


def _feed(session, graph: ExportedGraph, ids: list[int]) -> dict[str, np.ndarray]:
    """One window with an empty cache, each input in the session's type (a half graph's cache is fp16)."""
    from edgekit.quantize import CalibrationReader

    types = {i.name: i.type for i in session.get_inputs()}
    feed = CalibrationReader(graph, [ids]).feeds[0]
    missing = set(types) - set(feed)
    if missing:
        raise EdgekitError(f"the graph has inputs edgekit does not feed: {sorted(missing)}",
                           "calibrate the export's own model.onnx")
    return {k: v.astype(NUMPY_TYPES.get(types[k], v.dtype)) for k, v in feed.items() if k in types}
