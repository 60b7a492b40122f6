"""A sweep's result: one row per cell, as JSON (``OUT/sweep.json``), a Rich table, a PNG and a bundle."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
HEADERS = ["cell", "profile", "precision", "quant", "status", "engine MB", "ppl Δ", "top-1", "decode tok/s",
           "TTFT ms", "node", "s"]


@dataclass(frozen=True)
class SweepReport:
    """What ``run_sweep`` returns; ``to_dict()`` is ``OUT/sweep.json``."""

    export: str
    model: str | None
    out: str
    cells: tuple[dict[str, Any], ...]
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["status"] != "ok"]

    @property
    def ok(self) -> list[dict[str, Any]]:
        return [c for c in self.cells if c["status"] == "ok"]

    def counts(self) -> dict[str, int]:
        """ok / failed / cached (done by an earlier run) / ran (this run)."""
        return {"ok": len(self.ok), "failed": len(self.failed), "cached": sum(bool(c.get("cached")) for c in self.cells),
                "ran": sum(not c.get("cached") for c in self.cells)}

    def to_dict(self) -> dict[str, Any]:
        from edgekit import __version__

        return {"schema_version": SCHEMA_VERSION, "format": "edgekit-sweep", "edgekit_version": __version__,
                "export": self.export, "model": self.model, "settings": self.settings, "counts": self.counts(),
                "cells": list(self.cells)}

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path`` (through a temporary file)."""
        import os

        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        os.replace(tmp, path)

    def engines(self) -> list[Path]:
        """The build folders of the cells that succeeded, in the report's order."""
        return [Path(self.out) / c["engine"] for c in self.ok]


def table_rows(report: SweepReport) -> list[list[str]]:
    """One row of strings per cell (HEADERS); a failed cell's error follows the table."""
    return [_row(c) for c in report.cells]


def _row(c: dict[str, Any]) -> list[str]:
    status = "ok" + (" (cached)" if c.get("cached") else "") if c["status"] == "ok" else f"failed: {c['stage']}"
    quality, bench = c.get("quality") or {}, c.get("bench") or {}
    decode = (bench.get("decode_tokens_per_s") or {}).get("median")
    ttft = next(iter((bench.get("ttft_ms") or {}).values()), None)
    return [c["id"][:8], Path(c["profile"]).stem, c.get("precision_built") or c["precision"] or "default",
            c.get("quantization_built") or c["quantization"] or "default", status,
            _num(c.get("engine_bytes"), 1e6), _pct(quality.get("perplexity_increase"), "+"), _pct(quality.get("top1_agreement")),
            _num(decode), _num(ttft), c.get("node") or "–", _num(c.get("seconds"))]


def render_table(report: SweepReport):
    """A Rich renderable: the table, then one line per failed cell with its error and hint."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    counts = report.counts()
    table = Table(title=f"sweep of {escape(report.export)}: {counts['ok']} ok, {counts['failed']} failed, "
                        f"{counts['cached']} already done", title_justify="left")
    for header in HEADERS:
        table.add_column(header, justify="left" if header in ("cell", "profile", "status", "node") else "right",
                         no_wrap=True)
    for row, cell in zip(table_rows(report), report.cells):
        style = "red" if cell["status"] != "ok" else None
        table.add_row(*[escape(v) for v in row], style=style)
    notes = [Text.from_markup(f"[red]{escape(c['id'][:8])}[/] {escape(_label(c))}: {escape(c['error'] or '')}"
                              + (f" [dim](hint: {escape(c['hint'])})[/]" if c.get("hint") else ""))
             for c in report.failed]
    return Group(table, *notes)


def _label(c: dict[str, Any]) -> str:
    return f"{Path(c['profile']).stem}/{c['precision'] or 'default'}/{c['quantization'] or 'default'}"


def write_plot(report: SweepReport, path: str | Path) -> None:
    """A PNG: engine size per cell, and decode tokens/s (``--bench``) or top-1 agreement (``--quality``)."""
    from edgekit.bench.report import FAILED_COLOR, check_plotting

    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    cells = list(report.cells)
    names = [_label(c) for c in cells]
    second = _second_panel(cells)
    figure, axes = plt.subplots(1, 2 if second else 1, figsize=(12 if second else 7, 4.6), squeeze=False)
    _bars(axes[0][0], names, [c.get("engine_bytes") and c["engine_bytes"] / 1e6 for c in cells], "engine MB",
          FAILED_COLOR)
    if second:
        title, values = second
        _bars(axes[0][1], names, values, title, FAILED_COLOR)
    figure.suptitle(f"edgekit sweep · {report.model or report.export}", fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120, metadata={"Software": "edgekit sweep"})
    plt.close(figure)


def _second_panel(cells: list[dict[str, Any]]) -> tuple[str, list[float | None]] | None:
    if any(c.get("bench") for c in cells):
        return "decode tokens/s (higher is better)", [((c.get("bench") or {}).get("decode_tokens_per_s") or {}).get("median")
                                                      for c in cells]
    if any(c.get("quality") for c in cells):
        return "top-1 agreement with PyTorch fp32", [(c.get("quality") or {}).get("top1_agreement") for c in cells]
    return None


def _bars(axes, names: list[str], values: list[float | None], ylabel: str, failed_color: str) -> None:
    for x, value in enumerate(values):
        if value is None:  # a failed cell keeps its place, marked
            axes.text(x, 0.02, "failed", transform=axes.get_xaxis_transform(), rotation=90, ha="center",
                      va="bottom", color=failed_color, fontsize=8, fontweight="bold")
            continue
        bars = axes.bar([x], [value], color="#4878a8")
        axes.bar_label(bars, labels=[f"{value:.3g}"], fontsize=8, padding=2)
    axes.set_xlim(-0.6, len(names) - 0.4)  # a failed last cell's mark stays inside the axes
    axes.set_xticks(range(len(names)), names, rotation=20, ha="right", fontsize=7)
    axes.set_ylabel(ylabel)


def pack_results(report: SweepReport, bundle: str | Path, sign_with: str | Path | None = None, force: bool = False):
    """The engines of every ok cell in one bundle (``edgekit.bundle.pack_bundle``); returns its BundleInfo."""
    from edgekit.errors import EdgekitError

    engines = report.engines()
    if not engines:
        raise EdgekitError("no cell of the sweep succeeded: nothing to package", "see the failed cells above")
    from edgekit.bundle import pack_bundle

    return pack_bundle(engines, bundle, sign_with=sign_with, force=force)


def _num(value: float | None, scale: float = 1) -> str:
    return "–" if value is None else f"{value / scale:.3g}" if abs(value / scale) < 1000 else f"{value / scale:.0f}"


def _pct(value: float | None, sign: str = "") -> str:
    return "–" if value is None else format(value, f"{sign}.1%")
