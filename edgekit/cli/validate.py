"""``edgekit validate PATH --reference MODEL [--quality TEXTFILE]``."""

from __future__ import annotations

from pathlib import Path

import typer

from edgekit.cli._output import console, json_errors, print_json, quiet_libraries


def validate(
    path: Path = typer.Argument(..., help="An export or build folder (edgekit export / edgekit build)."),
    reference: str = typer.Option(..., "--reference", help="The PyTorch model: folder, hub id or preset."),
    prompt_length: int = typer.Option(16, "--prompt-length", help="Prompt tokens."),
    steps: int = typer.Option(32, "--steps", help="Greedy tokens to compare (the first comes from the prompt)."),
    tolerance: float = typer.Option(None, "--tolerance", help="Max abs logit difference (default by dtype: fp32 1e-3)."),
    quality: Path = typer.Option(None, "--quality", help="Measure perplexity, top-1 agreement and KL on this text instead of logit parity (for quantized builds)."),
    max_tokens: int = typer.Option(1024, "--max-tokens", help="With --quality: tokens of the text to score."),
    json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Compare the export's logits and greedy tokens with PyTorch; exit 1 when over tolerance."""
    quiet_libraries()
    with json_errors(json_out, {"passed": False}):  # --json: a JSON object even when validate cannot run
        if quality is not None:
            _quality(path, reference, quality, max_tokens, json_out)
            return
        from edgekit.validate import validate as run_validate

        with console.status("Validating against PyTorch..."):
            report = run_validate(path, reference, prompt_length=prompt_length, steps=steps, tolerance=tolerance)
    _finish(report, json_out,
            f"max |Δlogit| {report.max_abs_diff:.2e} (tolerance {report.tolerance:.0e}), "
            f"min cosine {report.min_cosine_similarity:.6f}, greedy {report.greedy_match}/{report.greedy_total}")


def _finish(report, json_out: bool, summary: str) -> None:
    """Print the report (JSON, or a PASS/FAIL line) and exit 1 when it failed."""
    if json_out:
        print_json(report.to_dict())
    else:
        console.print(f"{'[green]PASS[/]' if report.passed else '[red]FAIL[/]'}  {summary}")
    if not report.passed:
        raise typer.Exit(1)


def _quality(path: Path, reference: str, text: Path, max_tokens: int, json_out: bool) -> None:
    from edgekit.quality import MAX_PERPLEXITY_INCREASE, MIN_TOP1_AGREEMENT, measure_quality
    from edgekit.types import ExportedGraph
    from edgekit.validate import check_reference

    check_reference(ExportedGraph.load(path), reference)  # before minutes of scoring against the wrong model
    from edgekit.cli._progress import progress_bar

    with progress_bar(enabled=not json_out) as progress:
        report = measure_quality(path, reference, text, max_tokens=max_tokens, on_progress=progress)
    _finish(report, json_out,
            f"perplexity {report.perplexity:.3f} vs reference {report.reference_perplexity:.3f} "
            f"({report.perplexity_increase:+.1%}, limit +{MAX_PERPLEXITY_INCREASE:.0%}), "
            f"top-1 agreement {report.top1_agreement:.1%} (min {MIN_TOP1_AGREEMENT:.0%}), "
            f"KL {report.kl_divergence:.4f} over {report.tokens} tokens")
