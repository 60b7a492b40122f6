"""run_bench measures what it claims: known delays show up as such, contenders alternate,
failing peers are reported, and the report carries every documented key."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
import types

import pytest

from edgekit.bench import EdgekitContender, RunTiming, run_bench
from edgekit.bench.contenders import Loaded
from edgekit.bench.report import CONTENDER_KEYS
from edgekit.errors import ArtifactError, ConfigError
from edgekit.types import ExportedGraph

ARCH = "Qwen3ForCausalLM"
QUICK = {"prompt_lengths": (8,), "new_tokens": 6, "runs": 2, "warmup": 0}


class Sleepy:
    """A real OrtSession that sleeps 20 ms before every forward pass, and records how long each
    sleep really took (a busy machine oversleeps: the bench must report what happened)."""

    def __init__(self, session, delay_s: float = 0.020):
        self.session, self.delay_s, self.slept_ms = session, delay_s, []

    def reset(self, capacity: int = 0) -> None:
        self.session.reset(capacity)

    def forward(self, token_ids):
        start = time.perf_counter()
        time.sleep(self.delay_s)
        self.slept_ms.append((time.perf_counter() - start) * 1000)
        return self.session.forward(token_ids)


def by_name(report) -> dict:
    return {row["name"]: row for row in report.to_dict()["contenders"]}


def test_a_known_delay_per_step_is_reported_as_such(exported):
    path = exported(ARCH)
    sleepers: list[Sleepy] = []
    slow = EdgekitContender(path, name="edgekit+20ms", wrap=lambda s: sleepers.append(Sleepy(s)) or sleepers[-1])
    # 5 runs of 16 tokens: medians that a busy machine's preemptions do not move by 30%
    rows = by_name(run_bench(path, prompt_lengths=(8,), new_tokens=16, runs=5, warmup=1, compare=[slow]))
    fast, slow = rows["edgekit"], rows["edgekit+20ms"]
    delay = statistics.median(sleepers[0].slept_ms)
    assert delay >= 20
    assert slow["tpot_ms"]["p50"] == pytest.approx(fast["tpot_ms"]["p50"] + delay, rel=0.3)
    assert slow["ttft_ms"]["8"] == pytest.approx(fast["ttft_ms"]["8"] + delay, rel=0.3)
    fast_step = 1000 / fast["decode_tokens_per_s"]["median"]
    assert slow["ratio_vs_first"]["decode"] == pytest.approx(fast_step / (fast_step + delay), rel=0.3)
    assert slow["ratio_vs_first"]["decode"] == pytest.approx(
        slow["decode_tokens_per_s"]["median"] / fast["decode_tokens_per_s"]["median"])
    assert slow["tokens_match_first"] is True and slow["tokens_generated"] == 16


def test_time_to_first_token_grows_with_the_prompt(exported):
    rows = by_name(run_bench(exported(ARCH), prompt_lengths=(8, 200), new_tokens=4, runs=3, warmup=1))
    row = rows["edgekit"]
    assert row["ttft_ms"]["200"] > row["ttft_ms"]["8"]
    for n in ("8", "200"):
        assert row["prefill_tokens_per_s"][n] == pytest.approx(int(n) / (row["ttft_ms"][n] / 1000))
    assert row["engine_bytes"] > 0 and 0 < row["roofline_fraction"] < 1


class Recorder:
    """A contender that logs every call into a shared list and returns fixed timings."""

    def __init__(self, name: str, log: list, fail_on_run: int | None = None):
        self.name, self.log, self.fail_on_run, self.runs = name, log, fail_on_run, 0

    def load(self) -> Loaded:
        self.log.append((self.name, "load"))
        return Loaded(1.0, 1000, "fake")

    def run(self, prompt_ids, new_tokens) -> RunTiming:
        self.runs += 1
        self.log.append((self.name, len(prompt_ids), new_tokens))
        if self.runs == self.fail_on_run:
            raise RuntimeError("boom")
        return RunTiming(len(prompt_ids), 5.0, (1.0,) * (new_tokens - 1), 5.0 + new_tokens, tuple(range(new_tokens)))

    def memory(self):
        return {"peak_rss_mb": 1.0, "peak_device_mb": None}

    def close(self) -> None:
        self.log.append((self.name, "close"))


def test_contenders_alternate_within_each_round(exported):
    log: list = []
    path = exported(ARCH)
    run_bench(path, prompt_lengths=(8, 16), new_tokens=3, runs=2, warmup=1,
              compare=[Recorder("a", log), Recorder("b", log)])
    assert log[:2] == [("a", "load"), ("b", "load")]
    one_round = [("a", 8, 3), ("a", 16, 1), ("b", 8, 3), ("b", 16, 1)]
    assert log[2:-2] == one_round * 3  # warmup + 2 runs, the same order every round
    assert log[-2:] == [("a", "close"), ("b", "close")]


def test_a_failing_contender_is_reported_and_the_rest_go_on(exported):
    log: list = []
    report = run_bench(exported(ARCH), **{**QUICK, "runs": 3},
                       compare=[Recorder("flaky", log, fail_on_run=2), Recorder("steady", log)])
    rows = by_name(report)
    assert rows["flaky"]["error"] == "RuntimeError: boom" and rows["flaky"]["decode_tokens_per_s"] is None
    assert rows["steady"]["error"] is None and rows["steady"]["decode_tokens_per_s"]["median"] == pytest.approx(1000)
    assert sum(1 for entry in log if entry[0] == "flaky" and len(entry) == 3) == 2  # not run after failing
    assert rows["edgekit"]["error"] is None


def test_a_missing_peer_is_reported_not_fatal(exported):
    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("optimum is installed here")
    rows = by_name(run_bench(exported(ARCH), **QUICK, compare=["optimum", f"genai={sys.executable}"]))
    for name in ("optimum", "genai"):  # in this process, and through a worker process
        assert rows[name]["error"].startswith("not installed: pip install"), rows[name]["error"]
        assert rows[name]["decode_tokens_per_s"] is None
    assert rows["edgekit"]["decode_tokens_per_s"]["median"] > 0


def test_peer_worker_process_times_real_generation(exported):
    """transformers' own generate() in a worker process: tokens equal edgekit's, times present."""
    rows = by_name(run_bench(exported(ARCH), **QUICK, compare=[f"torch={sys.executable}"]))
    row = rows["torch"]
    assert row["error"] is None, row["error"]
    assert row["tokens_match_first"] is True and row["tokens_generated"] == 6
    assert row["tpot_ms"]["p50"] > 0 and row["load_ms"] > 0 and row["peak_rss_mb"] > 0
    assert "transformers" in row["detail"] and row["engine_bytes"] > 0


def test_torch_in_process_through_edgekit_runtimes(exported):
    rows = by_name(run_bench(exported(ARCH), **QUICK, compare=["torch"]))
    assert rows["torch"]["error"] is None and rows["torch"]["tokens_match_first"] is True
    assert rows["torch"]["peak_rss_mb"] > 0


def test_report_has_every_documented_key(exported):
    data = json.loads(json.dumps(run_bench(exported(ARCH), **QUICK, compare=["optimum"]).to_dict()))
    assert {"schema_version", "edgekit_version", "created", "machine", "settings", "contenders"} <= set(data)
    assert {"cpu_model", "cores", "ram_gb", "gpus", "profile"} <= set(data["machine"])
    assert {"prompt_lengths", "new_tokens", "runs", "warmup", "threads", "profile", "bandwidth_gbs",
            "load_average_before", "load_average_after"} <= set(data["settings"])
    assert all(data["settings"][k] >= 0 for k in ("load_average_before", "load_average_after"))
    for row in data["contenders"]:
        assert set(row) == set(CONTENDER_KEYS)
    ok = data["contenders"][0]
    assert set(ok["decode_tokens_per_s"]) == {"median", "min", "max"} == set(ok["e2e_ms"])
    assert set(ok["tpot_ms"]) == {"p50", "p90", "p99"}
    assert set(ok["ttft_ms"]) == set(ok["prefill_tokens_per_s"]) == {"8"}
    assert set(ok["ratio_vs_first"]) == {"decode", "ttft"} and ok["peak_device_mb"] is None


def test_edgepkg_goes_through_open_bundle(exported, monkeypatch, tmp_path):
    path = exported(ARCH)
    calls = []
    bundle = types.ModuleType("edgekit.bundle")
    bundle.open_bundle = lambda p, profile: calls.append((str(p), profile)) or path
    monkeypatch.setitem(sys.modules, "edgekit.bundle", bundle)
    report = run_bench(tmp_path / "m.edgepkg", profile="cpu-x86-64", **QUICK)
    assert calls == [(str(tmp_path / "m.edgepkg"), "cpu-x86-64")] and report.contenders[0]["error"] is None
    monkeypatch.setitem(sys.modules, "edgekit.bundle", None)  # an edgekit without bundles
    with pytest.raises(ArtifactError, match="cannot open bundles"):
        run_bench(tmp_path / "m.edgepkg", **QUICK)


@pytest.mark.parametrize("kwargs, message", [
    ({"compare": ["genia"]}, "Did you mean 'genai'"),
    ({"compare": ["torch:int4"]}, "only genai takes a variant"),
    ({"compare": ["edgekit:int4"]}, "takes a label and a path"),
    ({"new_tokens": 1}, "nothing to decode"),
    ({"prompt_lengths": "max", "new_tokens": 10}, "positions"),
])
def test_bad_settings_are_refused_before_running(exported, kwargs, message):
    if kwargs.get("prompt_lengths") == "max":
        kwargs = {**kwargs, "prompt_lengths": (ExportedGraph.load(exported(ARCH)).model.max_position_embeddings - 5,)}
    with pytest.raises(ConfigError, match=message):
        run_bench(exported(ARCH), **{**QUICK, **kwargs})


def test_no_torch_import_without_the_torch_contender(exported):
    code = ("import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
            "from edgekit.bench import run_bench\n"
            f"r = run_bench({str(exported(ARCH))!r}, prompt_lengths=(8,), new_tokens=3, runs=1, warmup=0)\n"
            "assert r.contenders[0]['error'] is None\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_a_second_edgekit_folder_runs_beside_the_first(exported):
    path = exported(ARCH)
    report = run_bench(path, **{**QUICK, "compare": [f"edgekit:again={path}"]})
    rows = {c["name"]: c for c in report.contenders}
    assert rows["edgekit:again"]["error"] is None and rows["edgekit:again"]["decode_tokens_per_s"]["median"] > 0
    assert rows["edgekit:again"]["tokens_match_first"] is True  # the same folder: the same greedy tokens


@pytest.mark.parametrize("load, marked", [(0.2, False), (9.0, True)])
def test_the_load_around_the_runs_is_printed_and_a_busy_machine_marked(exported, monkeypatch, load, marked):
    from edgekit.bench import metrics
    from edgekit.bench.report import to_markdown

    monkeypatch.setattr(metrics, "load_average", lambda: load)
    text = to_markdown(run_bench(exported(ARCH), **QUICK))
    title = text.splitlines()[0]
    assert f"load {load:.2f}→{load:.2f}" in title
    assert ("(BUSY: not a measurement)" in title) is marked
