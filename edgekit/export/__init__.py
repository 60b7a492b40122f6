"""``export_model``: trace a Hugging Face decoder into ONNX for one target.

    MODEL ─resolve→ HF folder ─load→ torch model ─wrap→ DecoderForExport
          ─torch.onnx (dynamo) + custom-op translations→ ai.edgekit graph
          ─lower(target)→ model.onnx + edgekit.json (+ tokenizer, generation config)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from pathlib import Path

from edgekit._files import check_output, resumable_dir
from edgekit.errors import EdgekitError
from edgekit.export.writer import journaled_tensors
from edgekit.types import DTYPES, TARGETS, ExportedGraph, TensorSpec, check_choice

QUANT_CHOICES = ("none", "int8", "int4")

log = logging.getLogger(__name__)


class ExportInterrupted(EdgekitError):
    """Ctrl-C during an export; exits 130 like any interrupted command."""

    exit_code = 130

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
    "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json",
)
# Example (batch, new tokens, cached tokens) traced with; dims stay symbolic, so any value works,
# but 0 and 1 would be specialized by torch.export.
TRACE_EXAMPLE = (2, 3, 5)


def export_model(
    model: str, out: str | Path, target: str = "ort", dtype: str = "fp32", force: bool = False,
    quant: str = "none", block_size: int | None = None, in_memory: bool = False, progress: bool = False,
    mtp: bool = False, mtp_vocab: int | None = None, symmetric: bool = False,
) -> ExportedGraph:
    """Export ``model`` (folder, preset or hub id) to ``out`` for ``target`` (one of ``TARGETS``).

    The model is traced with its parameters on the meta device; weights then stream from the
    checkpoint's safetensors into the external data one tensor at a time (``quant`` int4/int8
    quantizes each on the way), so memory is bounded by the largest tensor, not the model.
    ``in_memory`` (or a checkpoint without safetensors) loads the model instead; the rest of the
    path is the same. Work happens in ``.<out>.partial`` beside ``out``, renamed when complete;
    an interrupted export resumes there after its last complete tensor. ``mtp``: a Qwen3.5/3.6
    checkpoint's MTP head runs inside the graph (edgekit.export.mtp), for ``--speculative mtp``;
    ``mtp_vocab``: its LM head reads only the first that many ids (``edgekit.export.mtp.narrow_head``).
    ``symmetric``: int4 without zero points (as ``edgekit build --symmetric``).
    """
    from edgekit.errors import require

    check_choice("target", target, TARGETS)
    check_choice("dtype", dtype, DTYPES)
    check_choice("quant", quant, QUANT_CHOICES)
    out = Path(out)
    check_output(out, force, "export", inputs=[model] if Path(model).exists() else [])
    if quant != "none" and block_size is not None:
        from edgekit.export.quantize import check_block_size

        check_block_size(block_size)
    if symmetric and quant != "int4":
        raise EdgekitError("--symmetric applies with --quant int4", "add --quant int4, or drop --symmetric")
    require("torch", "export")
    if mtp_vocab is not None and not mtp:
        raise EdgekitError("--mtp-vocab applies with --mtp", "add --mtp, or drop --mtp-vocab")
    if mtp:  # before any work: a model without an MTP head is refused, not exported first
        from edgekit.export.mtp import check_mtp

        check_mtp(model, mtp_vocab)
    from edgekit.export import resolve
    from edgekit.export.archs import arch_for
    from edgekit.export.lower import TARGET_OPSETS

    folder = resolve.resolve_model(model)
    config = resolve.load_config(folder)
    arch = arch_for(config, folder / "config.json")
    generation = resolve.load_generation_config(folder)
    hf_model, source = _weights(folder, config, dtype, arch, in_memory, mtp)
    layers = arch.layers()
    if mtp:
        from edgekit.export.mtp import mtp_layer

        layers = (*layers, mtp_layer(arch))
    settings = {"target": target, "dtype": dtype, "quant": quant, "block_size": block_size, "mtp": mtp,
                "mtp_vocab": mtp_vocab, **({"symmetric": True} if symmetric else {})}  # resumes older partials
    with _interruptible(out), resumable_dir(out, force, "export", resumable=journaled_tensors) as work:
        onnx_model, figures = _build_graph(hf_model, arch, layers, source, target, quant, block_size, mtp_vocab,
                                           symmetric)
        written = _save(onnx_model, work / "model.onnx", [source.describe(), settings], progress)
        tokenizer_files = _copy_tokenizer(folder, work)
        graph = ExportedGraph(
            path=work,
            model=arch.spec(model, generation),
            target=target,
            dtype=dtype,
            opset=TARGET_OPSETS[target],
            custom_ops=tuple(_custom_ops(onnx_model.graph)),
            inputs=_specs(onnx_model.graph.inputs),
            outputs=_specs(onnx_model.graph.outputs),
            layers=layers,
            kv_cache={"layout": "batch, kv_heads, sequence, head_dim", "shared_buffer": target == "ort", "dtype": dtype},
            versions=_versions(),
            ops=_op_types(onnx_model.graph),
            tokenizer_files=tokenizer_files,
            quantization=figures,
            weights=written,
        )
        graph.save()
    return ExportedGraph.load(out)


@contextlib.contextmanager
def _interruptible(out: Path):
    """Turn Ctrl-C into one line that says whether (and from where) a rerun resumes."""
    try:
        yield
    except KeyboardInterrupt:
        work = out.with_name(f".{out.name}.partial")
        done = journaled_tensors(work) if work.is_dir() else 0
        if done:
            raise ExportInterrupted(f"interrupted; rerun the same command to resume from tensor {done + 1}",
                                    f"{done} weight tensors are kept in {work}") from None
        raise ExportInterrupted("interrupted before any weight was written; nothing was kept") from None


def _weights(folder: Path, config, dtype: str, arch, in_memory: bool, mtp: bool = False):
    """(model for tracing, weight source): meta parameters + the checkpoint, or the loaded model.
    ``mtp``: the model also holds its MTP head (before the source maps names, so mtp.* are mapped)."""
    from edgekit.export import checkpoint, resolve
    from edgekit.export.mtp import attach_head

    if in_memory or not checkpoint.Checkpoint.available(folder):
        hf_model = resolve.load_model(folder, config, dtype, arch.auto_class)
        if mtp:
            attach_head(hf_model, folder, config, on_meta=False)
        return hf_model, checkpoint.StateDict(hf_model)
    with checkpoint.params_on_meta():
        hf_model = resolve.build_model(config, dtype, arch.auto_class)
    if mtp:
        attach_head(hf_model, folder, config, on_meta=True)
    return hf_model, checkpoint.Checkpoint(folder, hf_model)


def _build_graph(hf_model, arch, layers, source, target: str, quant: str, block_size: int | None,
                 mtp_vocab: int | None = None, symmetric: bool = False):
    """Trace, attach lazy weights, fold, optimize, lower, fold again, (narrow the MTP head,) quantize:
    no weight is read."""
    import onnxscript

    from edgekit.export import checkpoint, lazy
    from edgekit.export.lower import lower

    onnx_model, wrapper = _trace(hf_model, arch, layers)
    checkpoint.attach(onnx_model, wrapper, hf_model, source)
    lazy.fold(onnx_model)
    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=lazy.is_lazy_input)
    lower(onnx_model, target)
    lazy.fold(onnx_model)
    if mtp_vocab is not None:
        from edgekit.export.mtp import narrow_head

        if not narrow_head(onnx_model, mtp_vocab):
            raise EdgekitError(f"--mtp-vocab {mtp_vocab}: the MTP head's LM head cannot be narrowed here "
                               "(it already has that few rows, or its weight is not a plain table)",
                               "leave --mtp-vocab out")
    figures = None
    if quant != "none":
        from edgekit.export.quantize import quantize_graph

        figures = quantize_graph(onnx_model, quant, block_size, symmetric=symmetric)
    return onnx_model, figures


def io_names(layers, mtp: bool = False) -> tuple[list[str], list[str]]:
    """Graph input and output names, genai/optimum style for the KV cache (``mtp``: + the head's logits)."""
    from edgekit.types import MTP_LOGITS, state_io

    states = state_io(layers)
    extra = [MTP_LOGITS] if mtp else []
    return ["input_ids", "attention_mask", *[s.past for s in states]], ["logits", *[s.present for s in states], *extra]


def _trace(hf_model, arch, layers):
    """torch.onnx (dynamo) export of the wrapper; custom ops become ai.edgekit nodes. -> (model, wrapper)

    Not optimized here: its weights may be meta tensors, which constant folding cannot read.
    """
    import torch

    from edgekit.export.ops import TRANSLATIONS
    from edgekit.export.wrapper import DecoderForExport
    from edgekit.types import state_io

    wrapper = DecoderForExport(hf_model, arch).eval()
    batch, seq, past_len = TRACE_EXAMPLE
    dtype = hf_model.lm_head.weight.dtype
    dim = torch.export.Dim
    b, s = dim("batch_size"), dim("sequence_length")
    t, p = dim("total_sequence_length"), dim("past_sequence_length", min=0)
    states, dynamic_states = [], []
    for io in state_io(layers):
        layer = io.layer
        if layer.has_kv:
            states.append(torch.zeros(batch, layer.num_kv_heads, past_len, layer.head_dim, dtype=dtype))
            dynamic_states.append({0: b, 2: p})
        else:
            state_dtype = torch.float32 if io.part == "recurrent" else dtype
            states.append(torch.zeros(batch, *layer.states[io.part], dtype=state_dtype))
            dynamic_states.append({0: b})
    ids = torch.zeros(batch, seq, dtype=torch.int64)
    mask = torch.ones(batch, past_len + seq, dtype=torch.int64)
    dynamic = ({0: b, 1: s}, {0: b, 1: t}, tuple(dynamic_states))  # *states is one entry
    inputs, outputs = io_names(layers, mtp=wrapper.mtp is not None)
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, (ids, mask, *states), dynamo=True, input_names=inputs, output_names=outputs,
            dynamic_shapes=dynamic, custom_translation_table=TRANSLATIONS, opset_version=23,
            optimize=False, verify=False, report=False, verbose=False,
        )
    model = program.model
    _name_present_dims(model)
    return model, wrapper


def _name_present_dims(model) -> None:
    """Present KV length: total for concat caches, the buffer length for a shared buffer."""
    import onnx_ir as ir

    for value in model.graph.outputs:
        if value.name.startswith("present.") and value.shape is not None:
            dims = list(value.shape)
            dims[2] = ir.SymbolicDim("present_sequence_length")
            value.shape = ir.Shape(dims)


def _save(model, path: Path, identity, progress: bool) -> dict:
    """Weights to ``<path>.data`` (streamed, resumable), then the graph to ``path``; returns figures."""
    import onnx_ir as ir

    from edgekit.export.writer import write_weights

    written = write_weights(model, path.parent, path.name + ".data", identity, progress)
    ir.save(model, path)
    return written


def _copy_tokenizer(folder: Path, out: Path) -> tuple[str, ...]:
    copied = []
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
            copied.append(name)
    return tuple(copied)


def _specs(values) -> tuple[TensorSpec, ...]:
    import onnx_ir as ir

    def dtype(value):
        return ir.DataType(value.dtype).numpy().name if value.dtype is not None else "unknown"

    def shape(value):
        return tuple(d if isinstance(d, int) else str(d) for d in (value.shape or ()))

    return tuple(TensorSpec(v.name, dtype(v), shape(v)) for v in values)


def _custom_ops(graph) -> list[str]:
    return sorted({f"{n.domain}.{n.op_type}" for n in graph if n.domain not in ("", "ai.onnx")})


def _op_types(graph) -> tuple[str, ...]:
    return tuple(sorted({n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in graph}))


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    import edgekit

    versions = {"edgekit": edgekit.__version__}
    for pkg in ("torch", "transformers", "onnx", "onnxscript", "onnx-ir", "onnxruntime"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return versions
