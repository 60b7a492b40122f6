"""``edgekit export MODEL -o OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

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
) -> None:
    """Trace MODEL into ONNX with attention as custom ops, lowered for --target."""
    quiet_libraries()
    from edgekit.export import export_model

    with console.status(f"Exporting {model} ({target}, {dtype})..."):
        graph = export_model(model, out, target=target, dtype=dtype, force=force)
    ops = ", ".join(graph.custom_ops) or "standard ONNX ops only"
    console.print(f"[green]exported[/] {model} → {out}  ({graph.model.num_layers} layers, target {target}, {ops})")
