"""``edgekit export MODEL -o OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

from rich.markup import escape

from edgekit.cli._output import console, quiet_libraries


def export(
    model: str = typer.Argument(..., help="A local Hugging Face folder, a hub id, or a preset (tiny-qwen3, tiny-llama...)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder (must not exist unless --force)."),
    target: str = typer.Option("ort", help=(
        "ort: ONNX Runtime contrib ops; portable: standard ONNX ops incl. opset-23 Attention (TensorRT >= 10.15); "
        "decomposed: plain ONNX ops only, attention as MatMul/Softmax (TensorRT 10.3, JetPack 6.x)."
    )),
    dtype: str = typer.Option("fp32", help="fp32 | fp16 | bf16."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    quant: str = typer.Option("none", help=(
        "none | int8 | int4: quantize each weight as it is written (MatMulNBits; int4 also the embedding), "
        "so a model bigger than memory comes out small. Same arithmetic as `edgekit build --quant` (RTN)."
    )),
    block_size: int = typer.Option(None, help="int4/int8: weights per scale (power of two >= 16; default 32)."),
    symmetric: bool = typer.Option(False, "--symmetric", help="int4: no zero points, llama.cpp Q4_0's form (faster MatMulNBits), as `edgekit build --symmetric`."),
    in_memory: bool = typer.Option(False, "--in-memory", help=(
        "Load the whole model instead of streaming weights from its safetensors (used anyway without them)."
    )),
    mtp: bool = typer.Option(False, "--mtp", help=(
        "Qwen3.5/3.6: run the checkpoint's MTP head inside the graph (one more attention layer and an "
        "mtp_logits output), for `edgekit run --speculative mtp`.")),
    mtp_vocab: int = typer.Option(None, "--mtp-vocab", help=(
        "With --mtp: the head proposes only the first N token ids (the most frequent merges of a BPE "
        "vocabulary), so it reads N rows of the LM head instead of all, e.g. 32768 of Qwen3.5's 248k.")),
) -> None:
    """Trace MODEL into ONNX with attention as custom ops, lowered for --target.

    The model is traced without its weights; they stream from the checkpoint into
    OUT/model.onnx.data one tensor at a time, so memory stays near the largest tensor.
    An interrupted export resumes where it stopped when rerun with the same arguments.
    """
    quiet_libraries()
    from edgekit.export import export_model

    console.print(f"Exporting {escape(model)} ({target}, {dtype}{'' if quant == 'none' else ', ' + quant})...")
    graph = export_model(model, out, target=target, dtype=dtype, force=force, quant=quant, block_size=block_size,
                         in_memory=in_memory, progress=True, mtp=mtp, mtp_vocab=mtp_vocab, symmetric=symmetric)
    ops = ", ".join(graph.custom_ops) or "standard ONNX ops only"
    resumed = graph.weights.get("resumed_after", 0) if graph.weights else 0
    note = f", resumed after {resumed} tensors" if resumed else ""
    console.print(f"[green]exported[/] {escape(model)} → {escape(str(out))}  ({graph.model.num_layers} layers{' + its MTP head' if mtp else ''}, target {target}, {ops}{note})")
