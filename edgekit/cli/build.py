"""``edgekit build EXPORT_DIR --profile P -o OUT``."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli._output import console, print_json
from edgekit.errors import EdgekitError


def build(
    export_dir: Path = typer.Argument(..., help="An export folder (edgekit export)."),
    profile: str = typer.Option(..., "--profile", help="A profile name (edgekit profiles list) or a .toml path."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (not needed with --dry-run)."),
    runtime: str = typer.Option(None, "--runtime", help="ort | ort-cpu | ort-cuda | ort-tensorrt | tensorrt (default: the profile's first)."),
    precision: str = typer.Option(None, "--precision", help="fp32 | fp16 | bf16 | fp8 | int8 (default: the profile's)."),
    quant: str = typer.Option(None, "--quant", help="none | int8 | int4 weight-only (default: the profile's on CPU profiles, unless --precision is given)."),
    quant_method: str = typer.Option(None, "--quant-method", help="int4: rtn (default) | gptq (needs --calibration)."),
    block_size: int = typer.Option(None, "--block-size", help="int4: weights per scale (default: the profile's, else 32)."),
    calibration: Path = typer.Option(None, "--calibration", help="Text file for GPTQ calibration, tokenized with the export's tokenizer."),
    quant_lm_head: bool = typer.Option(True, "--quant-lm-head/--no-quant-lm-head", help="Quantize the output projection too."),
    quant_embeddings: bool = typer.Option(True, "--quant-embeddings/--no-quant-embeddings", help="int4: quantize the embedding table too (GatherBlockQuantized)."),
    quality: Path = typer.Option(None, "--quality", help="Measure perplexity / top-1 agreement / KL against the source model on this text; recorded in the sidecar."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the checked build plan as JSON; build nothing."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print the build's sidecar as JSON."),
) -> None:
    """Compile an export for a hardware profile: ONNX Runtime sessions or a TensorRT plan."""
    from edgekit.build import QuantOptions, build_engine, plan_build

    q = QuantOptions(quant, quant_method, block_size, quant_lm_head, str(calibration) if calibration else None,
                     quant_embeddings)
    if dry_run:
        print_json(plan_build(export_dir, profile, runtime, precision, q).to_dict())
        return
    if out is None:
        raise EdgekitError("--out is required unless --dry-run", "e.g. -o builds/my-model-l4")
    with console.status(f"Building {export_dir} for {profile}..."):
        graph = build_engine(export_dir, profile, out, runtime=runtime, precision=precision, force=force, quant=q,
                             quality_text=quality)
    if json_out:
        print_json(graph.build)
        return
    b = graph.build
    quantized = f", {b['quantization']} {b.get('quant_method') or ''}".rstrip() if b.get("quantization", "none") != "none" else ""
    console.print(f"[green]built[/] {export_dir} → {out}  ({b['runtime']}, {b['precision']}{quantized}, profile {b['profile']}, "
                  f"{b['memory']['total_bytes'] / 1e6:.1f} MB planned)")
    if "quality" in b:
        r = b["quality"]
        console.print(f"quality: perplexity {r['perplexity']:.3f} vs {r['reference_perplexity']:.3f} "
                      f"({r['perplexity_increase']:+.1%}), top-1 agreement {r['top1_agreement']:.1%}, KL {r['kl_divergence']:.4f}")
