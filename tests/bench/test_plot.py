"""The bench plot as people read it: log axes that keep a 100x gap visible, a value on every bar,
failed contenders marked "failed" in their place, and an output file edgekit did not write left alone."""

from __future__ import annotations

import json

import pytest

from edgekit.bench import RunTiming, run_bench
from edgekit.bench.report import PLOT_SOFTWARE, _short, plot_figure, write_plot
from tests.bench.test_bench import ARCH, Recorder
from tests.cli.test_cli import edgekit

pytest.importorskip("matplotlib", reason="the plot needs matplotlib (pip install 'edgekit-llm[plot]')")


class Slow(Recorder):
    """Fixed timings 100x slower than Recorder's: 100 ms per token, 500 ms to the first."""

    def run(self, prompt_ids, new_tokens) -> RunTiming:
        super().run(prompt_ids, new_tokens)
        return RunTiming(len(prompt_ids), 500.0, (100.0,) * (new_tokens - 1), 500.0 + 100 * new_tokens,
                         tuple(range(new_tokens)))


@pytest.fixture(scope="module")
def report(exported):
    log: list = []
    return run_bench(exported(ARCH), prompt_lengths=(8, 16), new_tokens=4, runs=1, warmup=0,
                     compare=[Recorder("fast", log), Slow("slow", log), Recorder("flaky", log, fail_on_run=1)])


def _bar_tops(axes) -> list[float]:
    """Each bar's top in axes fractions (0 = the bottom of the plot, 1 = its top)."""
    to_axes = axes.transAxes.inverted()
    return [to_axes.transform(axes.transData.transform((bar.get_x(), bar.get_height())))[1] for bar in axes.patches]


def test_log_axes_keep_a_100x_gap_visible(report):
    rows = {r["name"]: r for r in report.contenders}
    assert rows["fast"]["decode_tokens_per_s"]["median"] == pytest.approx(100 * rows["slow"]["decode_tokens_per_s"]["median"])
    figure = plot_figure(report)
    figure.canvas.draw()
    decode, ttft = figure.axes[:2]
    assert decode.get_yscale() == ttft.get_yscale() == "log"
    assert min(_bar_tops(decode)) > 0.15 and min(_bar_tops(ttft)) > 0.15  # on a linear axis: 1% of the height


def test_every_bar_carries_its_value(report):
    figure = plot_figure(report)
    decode, ttft = figure.axes[:2]
    texts = lambda axes: [t.get_text() for t in axes.texts]  # noqa: E731
    ok = [r for r in report.contenders if r["error"] is None]
    for row in ok:
        assert _short(row["decode_tokens_per_s"]["median"]) in texts(decode)
        for n in ("8", "16"):
            assert _short(row["ttft_ms"][n]) in texts(ttft)


def test_a_failed_contender_is_labelled_failed_in_its_place(report):
    figure = plot_figure(report)
    decode, ttft = figure.axes[:2]
    names = [t.get_text() for t in decode.get_xticklabels()]
    assert names == ["edgekit", "fast", "slow", "flaky"]
    marks = [t for t in decode.texts if t.get_text() == "failed"]
    assert [m.get_position()[0] for m in marks] == [names.index("flaky")]
    assert sum(t.get_text() == "failed" for t in ttft.texts) == 2  # one per prompt length
    assert "flaky: failed" in [t.get_text() for t in ttft.get_legend().get_texts()]


def test_the_png_is_marked_as_edgekit_bench(report, tmp_path):
    png = tmp_path / "bench.png"
    write_plot(report, png)
    head = png.read_bytes()[:4096]
    assert head.startswith(b"\x89PNG") and PLOT_SOFTWARE.encode() in head


def test_bench_does_not_overwrite_a_file_it_did_not_write(exported, tmp_path):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}\n')
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    for option, path in (("--output", notes), ("--plot", picture)):
        result = edgekit("bench", str(exported(ARCH)), "--runs", "1", option, str(path))
        assert result.returncode == 1 and f"{path} exists and edgekit bench did not write it" in result.stderr
        assert "hint:" in result.stderr and "Traceback" not in result.stderr
    assert json.loads(notes.read_text()) == {"mine": True} and len(picture.read_bytes()) == 72
