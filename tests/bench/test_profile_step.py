"""The per-step decode profile: its parts are ONNX Runtime's own timings, they add up to the step,
the LM head is found in an export and in an int4 build, and a known delay lands where it belongs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from edgekit.bench import profile_step
from edgekit.bench.profile_step import PARTS, lm_head_nodes, profile_decode
from edgekit.errors import ConfigError
from edgekit.types import ExportedGraph

ARCH = "Qwen3ForCausalLM"
SCRIPT = Path(__file__).parents[2] / "benchmarks" / "profile_decode.py"


def _logits_product(model_path: Path) -> str:
    """The graph's MatMul-like node nearest the logits output, found here without profile_step."""
    nodes = {o: n for n in onnx.load(str(model_path), load_external_data=False).graph.node for o in n.output}
    node = nodes["logits"]
    while "MatMul" not in node.op_type and node.op_type != "Gemm":
        node = nodes[node.input[0]]
    return node.name


def _check_parts(result: dict, contexts: list[str]) -> None:
    assert list(result["contexts"]) == contexts
    for row in result["contexts"].values():
        parts = row["parts_ms"]
        assert set(parts) == set(PARTS) and all(ms >= 0 for ms in parts.values()), parts
        assert sum(parts.values()) == pytest.approx(row["step_ms"], rel=1e-6)
        assert sum(row["parts_pct"].values()) == pytest.approx(100)
        for part in ("matmuls", "lm_head", "attention", "norms"):  # every one of them runs in each step
            assert parts[part] > 0, part
        assert sum(row["other_by_op"].values()) == pytest.approx(parts["other"])


def test_an_exports_step_splits_into_parts_that_add_up(exported):
    path = exported(ARCH)
    result = profile_decode(path, contexts=(8, 64), steps=4, threads=1)
    _check_parts(result, ["8", "64"])
    model = ExportedGraph.load(path).model_path
    assert result["lm_head"] == [_logits_product(model)] and lm_head_nodes(model) == {_logits_product(model)}


def test_an_int4_builds_lm_head_is_found(exported, tmp_path):
    from edgekit.engines import QuantOptions, build_engine

    build = build_engine(exported(ARCH), "cpu-x86-64", tmp_path / "int4", quant=QuantOptions("int4")).path
    result = profile_decode(build, contexts=(8,), steps=3, threads=1)
    _check_parts(result, ["8"])
    head = _logits_product(build / "model.onnx")
    assert result["lm_head"] == [head] and "MatMulNBits" in {
        n.op_type for n in onnx.load(str(build / "model.onnx"), load_external_data=False).graph.node if n.name == head}


class Slow:
    """The real session, 20 ms of sleep before each step: time outside the graph, by construction."""

    def __init__(self, session):
        self.inner, self.slept_ms = session, []

    def last_logits(self, ids):
        start = time.perf_counter()
        time.sleep(0.020)
        self.slept_ms.append((time.perf_counter() - start) * 1000)
        return self.inner.last_logits(ids)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def test_a_delay_outside_the_graph_is_reported_there(exported, monkeypatch):
    opened = []
    real_open = profile_step._open
    monkeypatch.setattr(profile_step, "_open", lambda *a: opened.append(Slow(real_open(*a))) or opened[-1])
    row = profile_decode(exported(ARCH), contexts=(8,), steps=4, warmup=1, threads=1)["contexts"]["8"]
    slept = min(opened[0].slept_ms)
    assert row["parts_ms"]["outside_graph"] >= slept
    in_graph = row["step_ms"] - row["parts_ms"]["outside_graph"]
    assert 0 < in_graph < slept  # a tiny model's run takes about a millisecond: the sleep is not in it


def test_contexts_beyond_the_model_are_refused(exported):
    limit = ExportedGraph.load(exported(ARCH)).model.max_position_embeddings
    with pytest.raises(ConfigError, match="do not fit the model's"):
        profile_decode(exported(ARCH), contexts=(limit,), steps=4)


def test_the_script_prints_a_markdown_table_and_writes_json(exported, tmp_path):
    out = tmp_path / "profile.json"
    run = subprocess.run([sys.executable, str(SCRIPT), str(exported(ARCH)), "--contexts", "8,16", "--steps", "2",
                          "--threads", "1", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    header = next(line for line in lines if line.startswith("| context"))
    assert "LM head" in header and "outside the graph" in header
    rows = [line for line in lines if line.startswith("| 8 ") or line.startswith("| 16 ")]
    assert len(rows) == 2 and json.loads(out.read_text())["steps"] == 2
    again = subprocess.run([sys.executable, str(SCRIPT), str(exported(ARCH)), "--contexts", "8", "--steps", "1",
                            "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and json.loads(out.read_text())["steps"] == 1  # its own earlier profile: replaced
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    kept = subprocess.run([sys.executable, str(SCRIPT), str(exported(ARCH)), "--json", str(notes)],
                          capture_output=True, text=True, timeout=300)
    assert kept.returncode == 1 and notes.read_text() == '{"mine": true}'
    assert kept.stderr.splitlines()[:2] == [f"error: {notes} exists and is not a decode profile; not replacing it",
                                            "hint: pass a new file name, or move that file away yourself"]
    bad = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path / "none")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and "error:" in bad.stderr and "hint:" in bad.stderr and "Traceback" not in bad.stderr
