"""A bench's result: the JSON document (schema in docs/bench.md), the Rich table and the PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.bench.contenders import Loaded, RunTiming
from edgekit.bench.metrics import percentiles, roofline_fraction, spread
from edgekit.errors import MissingDependencyError, OutputExistsError

SCHEMA_VERSION = 1
FAILED_COLOR = "#b03030"
PLOT_SOFTWARE = "edgekit bench"  # the PNG's Software text: how a later bench knows the plot is its own
CONTENDER_KEYS = ("name", "detail", "error", "load_ms", "ttft_ms", "prefill_tokens_per_s", "decode_tokens_per_s",
                  "tpot_ms", "e2e_ms", "tokens_generated", "tokens_match_first", "peak_rss_mb", "peak_device_mb",
                  "engine_bytes", "decode_bytes", "roofline_fraction", "ratio_vs_first", "speculative")


@dataclass
class Measured:
    """The raw record of one contender: its load, its timed runs per prompt length, its memory."""

    name: str
    loaded: Loaded | None = None
    runs: dict[int, list[RunTiming]] = field(default_factory=dict)
    memory: dict[str, float | None] = field(default_factory=dict)
    error: str | None = None
    decode_bytes: int | None = None  # weights one decode step reads (metrics.decode_bytes); None: unknown


@dataclass(frozen=True)
class BenchReport:
    """What ``run_bench`` returns; ``to_dict()`` is the documented JSON document."""

    machine: dict[str, Any]
    settings: dict[str, Any]
    contenders: tuple[dict[str, Any], ...]
    created: str = ""

    def to_dict(self) -> dict[str, Any]:
        from edgekit import __version__

        return {"schema_version": SCHEMA_VERSION, "edgekit_version": __version__, "created": self.created,
                "machine": self.machine, "settings": self.settings, "contenders": list(self.contenders)}

    def write_json(self, path: str | Path) -> None:
        """Write the JSON document to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def summarize(measured: list[Measured], lengths: list[int], bandwidth_gbs: float | None) -> tuple[dict, ...]:
    """One JSON object per contender (every key of CONTENDER_KEYS), ratios against the first."""
    rows = [_summary(m, lengths, bandwidth_gbs) for m in measured]
    first, first_tokens = rows[0], _tokens(measured[0], lengths[0])
    for row, m in zip(rows, measured):
        if row["error"] is None:
            row["ratio_vs_first"] = _ratios(row, first)
            tokens = _tokens(m, lengths[0])
            row["tokens_match_first"] = tokens == first_tokens if tokens and first_tokens else None
    return tuple(rows)


def _summary(m: Measured, lengths: list[int], bandwidth_gbs: float | None) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(CONTENDER_KEYS)
    row.update(name=m.name, error=m.error, decode_bytes=m.decode_bytes)
    if m.loaded is not None:
        # A peer's graph is not read: its files' bytes stand for what a step reads (an upper bound).
        row.update(detail=m.loaded.detail, load_ms=m.loaded.load_ms, engine_bytes=m.loaded.engine_bytes,
                   decode_bytes=m.decode_bytes or m.loaded.engine_bytes)
    if m.error is not None:
        return row
    decode = m.runs[lengths[0]]
    ttft = {str(n): spread([r.ttft_ms for r in m.runs[n]])["median"] for n in lengths}
    rates = [r.decode_tokens_per_s for r in decode if r.decode_tokens_per_s]
    row.update(
        ttft_ms=ttft,
        prefill_tokens_per_s={str(n): n / (ttft[str(n)] / 1000) for n in lengths},
        decode_tokens_per_s=spread(rates),
        tpot_ms=percentiles([ms for r in decode for ms in r.step_ms]),
        e2e_ms=spread([r.e2e_ms for r in decode]),
        tokens_generated=len(decode[-1].token_ids),
        **m.memory,
    )
    row["speculative"] = _speculation(decode)
    median_rate = row["decode_tokens_per_s"]["median"]
    row["roofline_fraction"] = roofline_fraction(row["decode_bytes"], bandwidth_gbs,
                                                 1000 / median_rate if median_rate else None)
    return row


def _speculation(runs: list[RunTiming]) -> dict[str, float] | None:
    """Acceptance over a speculative contender's decode runs: kept / proposed, kept per target step."""
    stats = [r.speculative for r in runs if r.speculative]
    if not stats:
        return None
    proposed, accepted, steps = (sum(s[key] for s in stats) for key in ("proposed", "accepted", "steps"))
    return {"acceptance_rate": accepted / proposed if proposed else 0.0,
            "mean_accepted": accepted / steps if steps else 0.0, "proposed": proposed, "accepted": accepted}


def _ratios(row: dict[str, Any], first: dict[str, Any]) -> dict[str, Any]:
    """The contender's value over the first's: decode (>1 is faster), ttft per length (>1 is slower)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    decode = ratio(row["decode_tokens_per_s"]["median"], (first["decode_tokens_per_s"] or {}).get("median"))
    ttft = {n: ratio(v, (first["ttft_ms"] or {}).get(n)) for n, v in row["ttft_ms"].items()}
    return {"decode": decode, "ttft": ttft}


def _tokens(m: Measured, length: int) -> tuple[int, ...] | None:
    runs = m.runs.get(length) if m.error is None else None
    return runs[-1].token_ids if runs else None


# ---- table --------------------------------------------------------------------------------------

def table_rows(report: BenchReport) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of the summary table; a failed contender's row holds its error."""
    lengths = [str(n) for n in report.settings["prompt_lengths"]]
    headers = ["contender", "load s", *[f"TTFT@{n} ms" for n in lengths], "decode tok/s (min–max)",
               "TPOT p50/p90/p99 ms", "peak RSS MB", "engine MB", "read/token MB", "roofline", "× decode", f"× TTFT@{lengths[-1]}"]
    rows = []
    for row in report.contenders:
        cells = [f"failed: {row['error']}"] + [""] * (len(headers) - 2) if row["error"] else _cells(row, lengths)
        rows.append([_name(row), *cells])
    return headers, rows


def _name(row: dict[str, Any]) -> str:
    """The contender, with its acceptance when it speculates: "speculative:ngram (accepted 0.62, 1.9/step)"."""
    spec = row.get("speculative")
    if not spec:
        return row["name"]
    return f"{row['name']} (accepted {spec['acceptance_rate']:.2f}, {spec['mean_accepted']:.2f}/step)"


def render_table(report: BenchReport):
    """A Rich renderable: the table (settings as its title), then each failed contender's error."""
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    headers, rows = table_rows(report)
    table = Table(title=_title(report), title_justify="left")
    for header in headers:
        table.add_column(header, justify="left" if header == "contender" else "right", no_wrap=True)
    failures = []
    for row in rows:
        if row[1].startswith("failed: "):
            failures.append(Text.from_markup(f"[red]{escape(row[0])}[/] {escape(row[1])}"))
            row = [row[0], "[red]failed[/]"] + row[2:]
        else:
            row = [escape(c) for c in row]
        table.add_row(*row)
    return Group(table, *failures)


def to_markdown(report: BenchReport) -> str:
    """The summary table as Markdown (for READMEs), with the settings line above it."""
    headers, rows = table_rows(report)
    lines = [_title(report), "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if row[1].startswith("failed: "):  # one cell for the whole error, verbatim
            row = [row[0], row[1].replace("|", "\\|")] + [""] * (len(headers) - 2)
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _title(report: BenchReport) -> str:
    s, m = report.settings, report.machine
    bandwidth = _bandwidth_text(s)
    return (f"{s['model']} · prompt {s['prompt_lengths'][0]} → {s['new_tokens']} tokens · median of {s['runs']} "
            f"· threads {s['threads'] or 'default'} · {m['cpu_model']} ({m['cores']} cores) · bandwidth {bandwidth}"
            f"{_load_text(s, m['cores'])}")


def _load_text(s: dict[str, Any], cores: int | None) -> str:
    """The load average before and after the runs; flagged when other processes had the cores
    before they started (after, it counts the bench's own threads too)."""
    loads = [s.get("load_average_before"), s.get("load_average_after")]
    if None in loads:
        return ""
    busy = cores and loads[0] > 0.75 * cores
    return f" · load {loads[0]:.2f}→{loads[1]:.2f}" + (" (BUSY: not a measurement)" if busy else "")


def _bandwidth_text(s: dict[str, Any]) -> str:
    """"12.3 GB/s read (measured; copy 9.9, datasheet 51.2)": the roofline's figure and those beside it."""
    if not s.get("bandwidth_gbs"):
        return "unknown"
    source = s.get("bandwidth_source") or ""
    if not source.startswith("measured"):
        return f"{s['bandwidth_gbs']:.1f} GB/s ({source})"
    beside = [f"copy {s['copy_gbs']:.1f}"] if s.get("copy_gbs") else []
    beside += [f"datasheet {s['datasheet_gbs']:.1f}"] if s.get("datasheet_gbs") else []
    return f"{s['bandwidth_gbs']:.1f} GB/s read (measured{'; ' + ', '.join(beside) if beside else ''})"


def _cells(row: dict[str, Any], lengths: list[str]) -> list[str]:
    decode, tpot, ratio = row["decode_tokens_per_s"], row["tpot_ms"], row["ratio_vs_first"]
    return [
        _num(row["load_ms"], 1000, ".2f"),
        *[_num(row["ttft_ms"][n], 1, ".1f") for n in lengths],
        f"{_num(decode['median'])} ({_num(decode['min'])}–{_num(decode['max'])})",
        "/".join(_num(tpot[p], 1, ".1f") for p in ("p50", "p90", "p99")),
        _num(row["peak_rss_mb"], 1, ".0f"),
        _num(row["engine_bytes"], 1e6, ".1f"),
        _num(row.get("decode_bytes"), 1e6, ".1f"),
        "–" if row["roofline_fraction"] is None else f"{row['roofline_fraction']:.0%}",
        _num(ratio["decode"], 1, ".2f"),
        _num(ratio["ttft"][lengths[-1]], 1, ".2f"),
    ]


def _num(value: float | None, scale: float = 1, spec: str = ".1f") -> str:
    return "–" if value is None else format(value / scale, spec)


# ---- plot ---------------------------------------------------------------------------------------

def check_replaceable(path: str | Path, ours: Callable[[Path], bool] | None = None,
                      what: str = "edgekit bench did not write it") -> None:
    """Refuse an output path that holds something edgekit did not write (``ours(path)`` False; by
    default: a report or plot of an earlier bench may be replaced), or whose folder does not exist;
    call it before the runs. ``what`` says, in the error, what the file is not."""
    path = Path(path)
    if not path.parent.is_dir():
        raise OutputExistsError(f"cannot write {path}: folder {path.parent} does not exist", "create it, or pass another path")
    if path.is_dir() or (path.exists() and not (ours or _written_by_bench)(path)):
        raise OutputExistsError(f"{path} exists and {what}; not replacing it",
                                "pass a new file name, or move that file away yourself")


def _written_by_bench(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(1 << 16)
    if head.startswith(b"\x89PNG"):
        return PLOT_SOFTWARE.encode() in head  # a tEXt chunk, written before the image data
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"schema_version", "edgekit_version", "contenders"} <= data.keys()


def check_plotting() -> None:
    """Raise MissingDependencyError, naming the extra, when matplotlib is not installed."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise MissingDependencyError("--plot needs matplotlib, which is not installed", "pip install 'edgekit-llm[plot]'")


def write_plot(report: BenchReport, path: str | Path) -> None:
    """Write :func:`plot_figure` as a PNG."""
    import matplotlib.pyplot as plt

    figure = plot_figure(report)
    figure.savefig(path, dpi=120, metadata={"Software": PLOT_SOFTWARE})
    plt.close(figure)


def plot_figure(report: BenchReport):
    """A matplotlib Figure: decode tokens/s (bars: median, whiskers: min–max) and time to first token
    per prompt length, on log axes (contenders can be 100x apart) with each bar's value written on it;
    a failed contender keeps its place, marked "failed" instead of a bar."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    rows = list(report.contenders)
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    _decode_bars(left, rows)
    _ttft_bars(right, rows, [str(n) for n in report.settings["prompt_lengths"]])
    figure.suptitle(_title(report), fontsize=7)
    figure.tight_layout()
    return figure


def _decode_bars(axes, rows: list[dict[str, Any]]) -> None:
    names = [r["name"] for r in rows]
    for x, row in enumerate(rows):
        rate = row["decode_tokens_per_s"] or {}
        if row["error"] is not None or not rate.get("median"):
            _failed(axes, x)
            continue
        median = rate["median"]
        whisker = [[median - (rate["min"] or median)], [(rate["max"] or median) - median]]
        bars = axes.bar([x], [median], yerr=whisker, capsize=4, color="#4878a8")
        axes.bar_label(bars, labels=[_short(median)], fontsize=8, padding=2)
    axes.set_yscale("log")
    _log_limits(axes, [v for r in rows if r["error"] is None for v in (r["decode_tokens_per_s"] or {}).values()])
    axes.set_xticks(range(len(rows)), names, rotation=20)
    axes.set_ylabel("decode tokens/s (log scale, higher is better)")


def _ttft_bars(axes, rows: list[dict[str, Any]], lengths: list[str]) -> None:
    from matplotlib.patches import Patch

    width = 0.8 / max(len(rows), 1)
    handles = []
    for i, row in enumerate(rows):
        xs = [j + i * width for j in range(len(lengths))]
        if row["error"] is not None:
            for x in xs:
                _failed(axes, x)
            handles.append(Patch(facecolor="none", edgecolor=FAILED_COLOR, label=f"{row['name']}: failed"))
            continue
        values = [(row["ttft_ms"] or {}).get(n) for n in lengths]
        bars = axes.bar(xs, [v or 0 for v in values], width, label=row["name"])
        axes.bar_label(bars, labels=[_short(v) if v else "" for v in values], fontsize=7, padding=2)
        handles.append(bars)
    axes.set_yscale("log")
    _log_limits(axes, [v for r in rows if r["error"] is None for v in (r["ttft_ms"] or {}).values()])
    axes.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(lengths))], [f"prompt {n}" for n in lengths])
    axes.set_ylabel("time to first token, ms (log scale, lower is better)")
    axes.legend(handles=handles, fontsize=8)


def _failed(axes, x: float) -> None:
    """A failed contender's place: the word "failed" where its bar would stand."""
    axes.text(x, 0.02, "failed", transform=axes.get_xaxis_transform(), rotation=90, ha="center", va="bottom",
              color=FAILED_COLOR, fontsize=8, fontweight="bold")


def _log_limits(axes, values: list[float]) -> None:
    """A log axis from a decade or more under the smallest bar (autoscaling would start at that bar
    and leave it a sliver) to room above the tallest for its label."""
    values = [v for v in values if v and v > 0]
    if values:
        axes.set_ylim(10 ** (math.floor(math.log10(min(values))) - 1), max(values) * 3)


def _short(value: float) -> str:
    """1234.5 -> "1.2k", 56.78 -> "56.8", 0.0123 -> "0.012": what fits on a bar."""
    if value >= 1000:
        return f"{value / 1000:.1f}k"
    return f"{value:.1f}" if value >= 1 else f"{value:.2g}"
