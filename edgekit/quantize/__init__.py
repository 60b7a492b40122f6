"""Weight-only quantization of an ONNX model, through ONNX Runtime's own quantizers.

    model.onnx (fp32, optimized) ─int4: MatMulNBitsQuantizer (RTN | GPTQ)→ MatMul → com.microsoft.MatMulNBits
                                 ─int8: quantize_dynamic (MatMul only)    → MatMul → DynamicQuantizeLinear + MatMulInteger

Only MatMuls whose weight is an initializer are quantized; embeddings (Gather) stay fp32 unless
``embeddings`` (int4 RTN: com.microsoft.GatherBlockQuantized, blocks along the hidden axis).
``lm_head`` is the last MatMul of the graph (the one producing ``logits``); with tied
embeddings it is the constant-folded transpose of the embedding table, and when both are int4
the Gather reads the LM head's quantized table (:mod:`edgekit.quantize.tied`): one copy.
GPTQ runs the model on calibration windows (text tokenized with the export's tokenizer),
each with an empty cache, to collect every MatMul's inputs.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit._files import model_bytes, model_files
from edgekit.errors import EdgekitError, require
from edgekit.quantize.tied import same_table, share_table
from edgekit.types import ExportedGraph, state_io


QUANT_CHOICES = ("none", "int8", "int4")
METHOD_CHOICES = ("rtn", "gptq")
DEFAULT_BLOCK_SIZE = 32
DEFAULT_ACCURACY_LEVEL = 4  # MatMulNBits: int8 compute (AVX2 / AVX-512 VNNI / ARM dot product)
CALIBRATION_WINDOW = 128
CALIBRATION_SAMPLES = 8
SEARCH_LIMIT = 2_000_000_000  # MatMul weights past which int4 RTN skips the clip search (~4 M weights/s)

Progress = Callable[[str, int, int], None]  # (what, done, total), as run_bench's on_progress


def _silent(what: str, done: int, total: int) -> None:
    """The default progress callback: nobody is watching."""


@dataclass(frozen=True)
class QuantSettings:
    """What ``quantize_model`` does, as data (recorded in the build plan)."""

    quantization: str  # none | int8 | int4
    method: str | None = None  # int4: rtn | gptq
    block_size: int | None = None  # int4: weights per scale
    accuracy_level: int | None = None  # int4: MatMulNBits compute type (0 = as the inputs, 4 = int8)
    lm_head: bool = True
    calibration: str | None = None
    embeddings: bool = False  # int4 rtn: the embedding Gather too (GatherBlockQuantized)
    lm_head_bits: int = 4  # int4 rtn: 8 quantizes the LM head (and the tied embedding it shares) to 8 bits
    symmetric: bool = False  # int4 rtn: no zero points (llama.cpp's Q4_0 form; MatMulNBits' faster kernel)


def quantize_model(graph: ExportedGraph, model: Path, settings: QuantSettings,
                   on_progress: Progress | None = None) -> dict[str, Any]:
    """Quantize ``model`` in place (external data beside it); returns figures for the sidecar.

    ``on_progress(what, done, total)`` is called as the work advances: once per weight the
    quantizer takes (RTN), or per stage where ONNX Runtime quantizes the model in one call.
    """
    onnx = require("onnx", ("cpu", "gpu"))  # the quantizers edit ONNX protos
    progress = on_progress or _silent

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # its INFO lines go to stdout
    before = model_bytes(model)
    proto = onnx.load(str(model))
    _name_unnamed(proto)  # before the LM head is found: the quantizers key nodes by name
    lm_head = _lm_head(proto)
    exclude = [] if settings.lm_head or lm_head is None else [lm_head]
    # ORT's GPTQ prints a progress bar on stdout, which `--json` keeps for the result alone.
    with contextlib.redirect_stdout(sys.stderr):
        if settings.quantization == "int4":
            from edgekit.quantize import mtp

            pairs = mtp.twins(proto)  # an MTP head's nodes on the model's tables: quantized with them, once
            with np.errstate(divide="ignore", invalid="ignore"):  # ORT's Gather quantizer divides by all-zero rows' scale 0
                proto, figures = _int4(graph, proto, settings, lm_head, [*exclude, *mtp.excluded(proto, pairs)],
                                       progress)
            if pairs:
                figures["mtp_nodes_shared"] = mtp.share_quantized(proto, pairs)
        else:
            figures = {"tied_table_shared": False}
            progress("int8: quantizing MatMuls", 0, 1)
            proto = _int8(model, exclude)
            progress("int8: quantizing MatMuls", 1, 1)
    progress("saving the quantized model", 0, 0)
    for stale in model_files(model):
        stale.unlink()
    onnx.save_model(proto, str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=model.name + ".data", size_threshold=1024)
    return {"fp32_model_bytes": before, "model_bytes": model_bytes(model),
            "quantized_matmuls": sum(n.op_type in ("MatMulNBits", "MatMulInteger") for n in proto.graph.node),
            "quantized_gathers": sum(n.op_type == "GatherBlockQuantized" for n in proto.graph.node),
            "lm_head_node": lm_head, **figures}


def _lm_head(proto, output: str = "logits") -> str | None:
    """The MatMul whose output reaches ``output`` (through at most a cast or reshape)."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    node = producer.get(output)
    for _ in range(4):
        if node is None or node.op_type == "MatMul":
            break
        node = producer.get(node.input[0])
    return node.name if node is not None and node.op_type == "MatMul" else None


def _int4(graph: ExportedGraph, proto, settings: QuantSettings, head: str | None, exclude: list[str],
          progress: Progress):
    from onnxruntime.quantization import matmul_nbits_quantizer as nbits

    block = settings.block_size or DEFAULT_BLOCK_SIZE
    if settings.method == "gptq":
        # A build's graph edits add a logits_to_keep input: 0 keeps every position.
        extra = {name: np.zeros(1, dtype=np.int64) for name in ("logits_to_keep",)
                 if any(i.name == name for i in proto.graph.input)}
        reader = CalibrationReader(graph, _calibration_ids(graph, settings.calibration), extra)
        algo = nbits.GPTQWeightOnlyQuantConfig(calibration_data_reader=reader, block_size=128)
    else:
        # ORT's default weight-only quantizer: blockwise round-to-nearest (asymmetric unless --symmetric), in C++.
        algo = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=settings.symmetric,
                                                  accuracy_level=settings.accuracy_level)
    what = "int4 GPTQ: calibrating and quantizing" if settings.method == "gptq" else "int4: quantizing weights"
    gather = _embedding(graph, proto)
    tied = settings.embeddings and head not in exclude and same_table(proto, gather, head)
    head_output = next((n.output[0] for n in proto.graph.node if n.name == head), None)
    weights = _matmul_weights(proto, exclude) if settings.method != "gptq" else {}
    if sum(int(np.prod(t.dims)) for t in weights.values()) > SEARCH_LIMIT:
        weights = {}  # the clip search would take hours: ORT's plain RTN, as the streamed export does
    if settings.lm_head_bits == 8 and head is not None and head not in exclude:
        # the LM head alone first, in 8 bits; the int4 pass then finds a MatMulNBits there, not a MatMul
        others = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.name != head]
        eight = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=settings.symmetric, bits=8,
                                                   accuracy_level=settings.accuracy_level)
        proto = _nbits(nbits, proto, settings, others, eight, progress, "int8: quantizing the LM head")
    proto = _nbits(nbits, proto, settings, exclude, algo, progress, what)
    if weights:  # ORT's RTN laid the nodes out; the clip-searched numbers replace its plain ones
        _search_ranges(proto, weights, settings.symmetric, progress)
    figures = {"clip_search": bool(weights), "tied_table_shared": False}
    if tied and share_table(proto, gather, head_output):  # one int4 table for the Gather and the LM head
        return proto, {**figures, "tied_table_shared": True}
    if settings.embeddings:  # a second, RTN pass: ORT quantizes Gather in its default quantizer only
        others = [n.name for n in proto.graph.node if n.op_type == "Gather" and n.name != gather]
        algo = nbits.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=settings.symmetric,
                                                  op_types_to_quantize=("Gather",),
                                                  quant_axes=(("Gather", 1),))
        proto = _nbits(nbits, proto, settings, others, algo, progress, "int4: quantizing the embedding")
    return proto, figures


def _matmul_weights(proto, exclude: list[str]) -> dict[str, Any]:
    """{MatMul output name: its fp32 (K, N) weight TensorProto} for the MatMuls to be quantized."""
    inits = {t.name: t for t in proto.graph.initializer}
    return {n.output[0]: inits[n.input[1]] for n in proto.graph.node
            if n.op_type == "MatMul" and n.name not in exclude and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2}


def _search_ranges(proto, weights: dict[str, Any], symmetric: bool, progress: Progress) -> None:
    """Overwrite each int4 MatMulNBits' levels, scales and zero points with :func:`clip.quantize_int4`'s."""
    from onnx import helper, numpy_helper

    from edgekit.quantize.clip import quantize_int4

    inits = {t.name: t for t in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.output[0] in weights
             and all(a.i == 4 for a in n.attribute if a.name == "bits")]  # an 8-bit LM head keeps ORT's RTN
    for done, node in enumerate(nodes):
        progress("int4: searching clip ranges", done, len(nodes))
        block = next(helper.get_attribute_value(a) for a in node.attribute if a.name == "block_size")
        parts = quantize_int4(numpy_helper.to_array(weights[node.output[0]]), block, symmetric)
        for name, array in zip(node.input[1:4], parts[:2] if symmetric else parts):  # symmetric: no zero points
            old = inits[name]
            old.CopyFrom(numpy_helper.from_array(array.reshape(tuple(old.dims)).astype(
                helper.tensor_dtype_to_np_dtype(old.data_type)), name))
    progress("int4: searching clip ranges", len(nodes), len(nodes))


def _nbits(nbits, proto, settings: QuantSettings, exclude: list[str], algo, progress: Progress, what: str):
    quantizer = nbits.MatMulNBitsQuantizer(proto, block_size=settings.block_size or DEFAULT_BLOCK_SIZE,
                                           is_symmetric=settings.symmetric, accuracy_level=settings.accuracy_level,
                                           nodes_to_exclude=exclude, algo_config=algo)
    total = _count_calls(quantizer, proto, algo, lambda done, total: progress(what, done, total))
    quantizer.process()
    progress(what, total, total)
    return quantizer.model.model


def _count_calls(quantizer, proto, algo, report: Callable[[int, int], None]) -> int:
    """Report each node the quantizer takes, of those it will be offered; returns their number.

    ORT's default (RTN) quantizer offers every node of ``algo``'s op types, not excluded, to its
    node quantizer one by one; GPTQ has none and quantizes the model in one call (one step).
    """
    node_quantizer = getattr(quantizer, "node_quantizer", None)
    if node_quantizer is None:
        report(0, 1)
        return 1
    offered = algo.op_types_to_quantize
    total = sum(n.op_type in offered and n.name not in quantizer.nodes_to_exclude for n in proto.graph.node)
    quantize, done = node_quantizer.quantize, 0

    def counted(node, graph_stack):
        nonlocal done
        nodes = quantize(node, graph_stack)
        done += 1
        report(min(done, total), total)  # min: a node of a subgraph would count past the top level's
        return nodes

    node_quantizer.quantize = counted
    report(0, total)
    return total


def _embedding(graph: ExportedGraph, proto) -> str | None:
    """The Gather reading the (vocab, hidden) embedding table; other constant Gathers stay as they are."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    want = [graph.model.vocab_size, graph.model.hidden_size]
    return next((n.name for n in proto.graph.node if n.op_type == "Gather" and shapes.get(n.input[0]) == want), None)


def _int8(model: Path, exclude: list[str]):
    import tempfile

    onnx = require("onnx", ("cpu", "gpu"))  # the quantizers edit ONNX protos
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    advice = _DropMessage("pre-processing before quantization")  # image-model advice, logged on the root logger
    root.addFilter(advice)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "model.onnx"
            quantize_dynamic(model, out, op_types_to_quantize=["MatMul"], weight_type=QuantType.QInt8,
                             nodes_to_exclude=exclude, use_external_data_format=True,
                             extra_options={"MatMulConstBOnly": True})
            return onnx.load(str(out))
    finally:
        root.removeFilter(advice)


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def _name_unnamed(proto) -> None:
    """The quantizers key their per-node settings by name; give nameless nodes one."""
    for i, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"/edgekit/{node.op_type}_{i}"


def _calibration_ids(graph: ExportedGraph, text_file: str | None) -> list[list[int]]:
    from edgekit.tokenizer import load_tokenizer

    if text_file is None or not Path(text_file).is_file():
        raise EdgekitError(f"GPTQ needs calibration text; --calibration {text_file} is not a file",
                           "pass --calibration TEXTFILE (text like the model's use), or --quant-method rtn")
    tokenizer = load_tokenizer(graph, required=True)
    ids = tokenizer.encode(Path(text_file).read_text(encoding="utf-8", errors="replace"))
    windows = [ids[i:i + CALIBRATION_WINDOW] for i in range(0, len(ids), CALIBRATION_WINDOW)]
    windows = [w for w in windows if len(w) == CALIBRATION_WINDOW][:CALIBRATION_SAMPLES]
    if not windows:
        raise EdgekitError(f"--calibration {text_file} has under {CALIBRATION_WINDOW} tokens",
                           "pass a longer calibration text (a few KB)")
    return windows


class CalibrationReader:
    """ONNX Runtime's CalibrationDataReader: one feed per window, each with an empty cache."""

    def __init__(self, graph: ExportedGraph, windows: list[list[int]], extra: dict[str, np.ndarray] | None = None):
        self.feeds = [{**self._feed(graph, w), **(extra or {})} for w in windows]
        self._index = 0  # an int, not an iterator: ORT deep-copies the reader

    @staticmethod
    def _feed(graph: ExportedGraph, window: list[int]) -> dict[str, np.ndarray]:
        feed = {"input_ids": np.asarray([window], dtype=np.int64),  # (1, S)
                "attention_mask": np.ones((1, len(window)), dtype=np.int64)}
        for io in state_io(graph.layers):
            layer = io.layer
            shape = (1, layer.num_kv_heads, 0, layer.head_dim) if layer.has_kv else (1, *layer.states[io.part])
            feed[io.past] = np.zeros(shape, dtype=np.float32)
        return feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        self._index += 1
        return self.feeds[self._index - 1] if self._index <= len(self.feeds) else None

    def __iter__(self):
        return iter(self.feeds)

    def rewind(self) -> None:
        self._index = 0
