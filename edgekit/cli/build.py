"""``edgekit build EXPORT_DIR --profile P -o OUT``."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from edgekit.cli._output import console, print_json
from edgekit.errors import EdgekitError

if TYPE_CHECKING:  # the CLI imports stages when a command runs, not for --help
    from edgekit.engines import BuildPlan


def _runtime_choices() -> list[str]:
    from edgekit.runtimes.registry import runtime_names, runtimes

    # The package's own runtimes: a broken EDGEKIT_RUNTIMES file is reported when a build needs it,
    # not while --help is being written.
    names = runtime_names(extras=False)
    families = {r.family for r in runtimes(extras=False).values()} - set(names)  # aliases such as "ort"
    return sorted(families) + names


def build(
    export_dir: Path = typer.Argument(..., help="An export folder (edgekit export)."),
    profile: str = typer.Option(..., "--profile", help="A profile name (edgekit profiles list) or a .toml path."),
    out: Path = typer.Option(None, "--out", "-o", help="Output folder (not needed with --dry-run)."),
    runtime: str = typer.Option(None, "--runtime", help=f"{' | '.join(_runtime_choices())} (default: the profile's first)."),
    precision: str = typer.Option(None, "--precision", help=(
        "fp32 | fp16 | bf16 | fp8 | int8 | int4 (default: the profile's). On GPU profiles the precision is "
        "put in the graph: int4 = weight-only DequantizeLinear with fp16 activations; int8 = the same on ort-cuda, "
        "SmoothQuant W8A8 Q/DQ on TensorRT (needs --calibration); fp8 = e4m3 Q/DQ (needs --calibration); "
        "see docs/precisions.md.")),
    quant: str = typer.Option(None, "--quant", help="CPU profiles: none | int8 | int4 weight-only with ONNX Runtime's quantizers (default: the profile's, unless --precision is given). GPU profiles: use --precision."),
    quant_method: str = typer.Option(None, "--quant-method", help="CPU int4: rtn (default) | gptq; GPU int4 / int8: rtn (default) | awq. gptq and awq need --calibration."),
    block_size: int = typer.Option(None, "--block-size", help="int4 / int8: weights per scale (default: the profile's; 32 on CPU, 128 on GPU)."),
    calibration: Path = typer.Option(None, "--calibration", help="Text file for GPTQ / AWQ / fp8 calibration, tokenized with the export's tokenizer."),
    quant_lm_head: bool = typer.Option(None, "--quant-lm-head/--no-quant-lm-head", help="Quantize the output projection too (default: yes; fp8: no)."),
    quant_embeddings: bool = typer.Option(None, "--quant-embeddings/--no-quant-embeddings", help="int4: quantize the embedding table too (default: yes on CPU profiles, no on GPU ones)."),
    lm_head_bits: int = typer.Option(None, "--lm-head-bits", help="CPU int4: 8 keeps the LM head (and a tied embedding) in 8 bits: closer to fp32, more bytes per token (default 4)."),
    symmetric: bool = typer.Option(None, "--symmetric/--asymmetric", help="CPU int4: no zero points, llama.cpp's Q4_0 form (MatMulNBits' faster kernel) or a zero point per block (default: asymmetric)."),
    graph_only: bool = typer.Option(False, "--graph-only", help=(
        "GPU profiles: write and check the ONNX graph the runtime would get (precision, Q/DQ) into OUT, "
        "without TensorRT or a GPU; --quality then measures it on ONNX Runtime's CPU provider.")),
    quality: Path = typer.Option(None, "--quality", help="Measure perplexity / top-1 agreement / KL against the source model on this text; recorded in the sidecar."),
    dry_run: bool = typer.Option(False, "--dry-run", help=(
        "Print the checked build plan and whether this machine can build it; build nothing.")),
    strip_weights: bool = typer.Option(False, "--strip-weights", help=(
        "TensorRT: a plan without its weights, refitted at load from the export (one copy of the weights "
        "serves plans for several GPUs in a bundle).")),
    draft: Path = typer.Option(None, "--draft", help=(
        "A smaller model's export or build with the same tokenizer, carried in OUT/draft for "
        "`run/serve --speculative draft` (bundles of OUT carry it too).")),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON: the build's sidecar (with --dry-run: the plan)."),
) -> None:
    """Compile an export for a hardware profile: ONNX Runtime sessions or a TensorRT plan."""
    from edgekit.engines import QuantOptions, build_engine, environment_problems, plan_build
    from edgekit.cli._progress import progress_bar

    if graph_only and dry_run:
        raise EdgekitError("--graph-only and --dry-run contradict: one writes the graph, the other writes nothing",
                           "drop one of them")
    q = QuantOptions(quant, quant_method, block_size, quant_lm_head, str(calibration) if calibration else None,
                     quant_embeddings, lm_head_bits, symmetric)
    if dry_run:
        plan = plan_build(export_dir, profile, runtime, precision, q, strip_weights)
        problems = environment_problems(plan)
        if json_out:
            print_json({**plan.to_dict(), "buildable_here": not problems, "not_buildable_because": problems})
        else:
            Console().print(plan_summary(plan, problems))
        return
    if out is None:
        raise EdgekitError("--out is required unless --dry-run", "e.g. -o builds/my-model-l4")
    with progress_bar(enabled=not json_out) as progress:
        engine = build_engine(export_dir, profile, out, runtime=runtime, precision=precision, force=force, quant=q,
                              quality_text=quality, on_progress=progress, strip_weights=strip_weights,
                              graph_only=graph_only, draft=draft)
    if json_out:
        print_json(engine.details)
        return
    b = engine.details
    if b.get("graph_only"):
        _print_graph(export_dir, out, b)
        return
    quantized = f", {b['quantization']} {b.get('quant_method') or ''}".rstrip() if b.get("quantization", "none") != "none" else ""
    console.print(f"[green]built[/] {escape(str(export_dir))} → {escape(str(out))}  ({b['runtime']}, "
                  f"{b['precision']}{quantized}, profile {escape(b['profile'])}, {b['memory']['total_bytes'] / 1e6:.1f} MB planned)")
    if b.get("graph"):
        console.print(f"graph: {escape(_graph_text(b['graph']))}")
    for note in b.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")
    _print_quality(b)


def _print_quality(b: dict) -> None:
    if "quality" in b:
        r = b["quality"]
        console.print(f"quality: perplexity {r['perplexity']:.3f} vs {r['reference_perplexity']:.3f} "
                      f"({r['perplexity_increase']:+.1%}), top-1 agreement {r['top1_agreement']:.1%}, KL {r['kl_divergence']:.4f}"
                      + (f" over {r['tokens']} tokens" if "tokens" in r else ""))
        if "measured_on" in r:
            console.print(f"  measured on {escape(r['measured_on'])}, against the {escape(r['reference'])}")


def _print_graph(export_dir: Path, out: Path, b: dict) -> None:
    """A --graph-only build: what graph was written, for which runtime, and its figures."""
    from edgekit._files import model_bytes

    g = b.get("graph") or {}
    size = model_bytes(out / b["model_file"])
    console.print(f"[green]graph written[/] {escape(str(export_dir))} → {escape(str(out / b['model_file']))}  "
                  f"({b['runtime']}, {escape(_graph_text(g) if g else b['precision'] + ', the export as it is')}, "
                  f"profile {escape(b['profile'])}, {size / 1e6:.1f} MB; no engine built)")
    if g:
        console.print(f"ops: {escape(', '.join(g['ops']))}")
    for note in b.get("notes", []):
        console.print(f"[yellow]note:[/] {escape(note)}")
    _print_quality(b)


def plan_summary(plan: BuildPlan, problems: list[str]) -> Table:
    """The plan as people read it: what will be built, for which shapes, in how much memory, and
    whether this machine can build it (``--json`` has every field)."""
    table = Table(title=escape(f"build plan: {plan.export} for {plan.profile} ({plan.device})"), title_justify="left",
                  show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    for label, value in _plan_rows(plan, problems):
        table.add_row(label, value)
    return table


def _plan_rows(plan: BuildPlan, problems: list[str]) -> list[tuple[str, str]]:
    """(label, Rich markup) pairs; text that comes from files or the machine is escaped."""
    mem, shapes = plan.memory, plan.shapes or {}
    rows = [
        ("runtime", escape(plan.runtime + (f" ({', '.join(plan.onnxruntime['providers'])})" if plan.onnxruntime else ""))),
        ("precision", f"{plan.precision} (export: {plan.export_dtype}, --target {plan.export_target})"),
        ("quantization", escape(_quant(plan))),
        ("shapes", " · ".join(f"{k} {'/'.join(map(str, v))}" for k, v in shapes.items()) + "  (min/opt/max)"),
        ("memory", f"{_size(mem['weights_bytes'])} weights + {_size(mem['kv_cache_bytes'])} KV cache at "
                   f"{mem['context']} tokens × batch {mem['batch']} = {_size(mem['total_bytes'])}, "
                   f"{mem['total_bytes'] / mem['budget_bytes']:.1%} of the {_size(mem['budget_bytes'])} budget"),
        ("requires", escape(", ".join(f"{k} {' '.join(v) if isinstance(v, list) else v}"
                                      for k, v in plan.requirements.items()))),
    ]
    if plan.graph:
        rows.append(("graph", escape(_graph_text(plan.graph)) + " → model.onnx in the build folder (--graph-only makes it here)"))
    if plan.tensorrt:
        trt = plan.tensorrt
        typing = "strongly typed (precision from the graph)" if trt.get("strongly_typed") else "+".join(trt["flags"]) or "FP32"
        rows.append(("tensorrt", f"{typing}, workspace {trt['workspace_bytes'] >> 20} MiB, "
                                 f"builder level {trt['builder_optimization_level']}, TensorRT >= {trt['min_version']}"))
    rows += [("note", f"[yellow]{escape(note)}[/]") for note in plan.notes]
    here = "[green]yes[/]" if not problems else "[red]no[/]: " + escape("; ".join(problems))
    return rows + [("buildable here", here)]


def _graph_text(g: dict) -> str:
    """A GPU graph recipe in words: "int4 weight-only rtn, block 128, fp16 activations (LM head int4)"."""
    if not g.get("weights"):
        return f"{g['activations']} weights and activations, numerically sensitive ops in fp32"
    if g["weights"] == "fp8":
        text = "fp8 e4m3 Q/DQ on weights and activations, fp16 elsewhere"
    elif g.get("method") == "smoothquant":
        text = "int8 Q/DQ on weights (per channel) and activations (per tensor), SmoothQuant, fp16 elsewhere"
    else:
        text = f"{g['weights']} weight-only {g['method']}, block {g['block_size']}, {g['activations']} activations"
    kept = [name for name, on in (("LM head", g.get("lm_head")), ("embeddings", g.get("embeddings"))) if not on]
    return text + (f" ({' and '.join(kept)} {g['activations']})" if kept else "")


def _quant(plan: BuildPlan) -> str:
    if plan.quantization == "none":
        return "in the graph (see graph)" if plan.graph and plan.graph.get("weights") else "none"
    parts = [f"{plan.quantization} {plan.quant_method or ''}".strip()]
    if plan.quant_block_size:
        parts.append(f"block {plan.quant_block_size}, accuracy level {plan.quant_accuracy_level}")
    if plan.quant_symmetric:
        parts.append("symmetric")
    if plan.quant_lm_head_bits == 8:
        parts.append("LM head int8")
    kept = [name for name, on in (("LM head", plan.quant_lm_head), ("embeddings", plan.quant_embeddings)) if on is False]
    return ", ".join(parts) + (f" (fp32: {', '.join(kept)})" if kept else "")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"
