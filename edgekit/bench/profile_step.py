"""Where one decode step's time goes, from ONNX Runtime's own profiler.

    folder ─ORT CPU session (profiling on)─> for each context C: prefill C random tokens, then
        warmup + steps single-token decode steps (wall time of each) ─end_profiling─> JSON events
        ─each step's model_run and the Node events inside it─> ms per part, mean over the steps

The parts of a step add up to its wall time:

    wall ┬ outside the graph   wall − model_run: Python, IO binding, copies, the argmax
         └ model_run ┬ graph overhead   model_run − Σ nodes: the executor between kernels
                     └ Σ nodes ─ matmuls | lm_head | attention | norms | other

The profiler itself costs a few microseconds per node, inside the graph overhead and the nodes:
read the split, not the absolute step time (bench that with ``edgekit bench``).
"""

from __future__ import annotations

import bisect
import json
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import ConfigError, RuntimeUnavailableError
from edgekit.types import Engine

__all__ = ["PARTS", "check_profile_output", "lm_head_nodes", "profile_decode", "profile_markdown"]

PARTS = ("matmuls", "lm_head", "attention", "norms", "other", "graph_overhead", "outside_graph")
MATMULS = {"MatMul", "MatMulNBits", "Gemm", "FusedMatMul", "MatMulInteger", "MatMulIntegerToFloat",
           "DynamicQuantizeMatMul", "QGemm", "QLinearMatMul", "MatMulBnb4", "MoE", "QMoE"}  # MoE: expert products
ATTENTION = {"GroupQueryAttention", "MultiHeadAttention", "Attention", "CausalAttention", "LinearAttention",
             "PagedAttention", "SparseAttention", "PackedAttention", "DecoderMaskedMultiHeadAttention",
             "RotaryEmbedding"}  # rotary: the attention's own positions (GQA fuses it when it can)
NORMS = {"SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
         "SkipLayerNormalization", "RMSNormalization", "RMSNorm", "AddRMSNorm"}
# Between the LM head's product and the logits output: still the logits' cost.
PASS_THROUGH = {"Cast", "Reshape", "Squeeze", "Unsqueeze", "Identity", "Transpose", "Flatten", "Softcap", "Tanh",
                "Div", "Mul"}


def profile_decode(folder: str | Path, contexts: Sequence[int] = (32, 512), steps: int = 16,
                   threads: int | None = None, warmup: int = 2, seed: int = 0) -> dict[str, Any]:
    """Profile ``steps`` single-token decode steps after a random prompt of each length in
    ``contexts``, on the export or build at ``folder`` (ONNX Runtime CPU).

    Returns ``{"model", "path", "threads", "steps", "warmup", "onnxruntime_version", "lm_head":
    [the nodes timed as the LM head], "contexts": {"32": {"step_ms", "parts_ms": {part: ms}, "parts_pct", "other_by_op"}}}``,
    means over the steps; the first ``warmup`` steps after each prefill are run and not counted.
    """
    engine = Engine.load(folder)
    _check(engine, list(contexts), steps, warmup)
    with tempfile.TemporaryDirectory(prefix="edgekit-profile-") as scratch:
        session = _open(engine, threads, str(Path(scratch) / "ort"))
        walls = {c: _decode(session, engine.graph.model.vocab_size, c, steps, warmup, seed) for c in contexts}
        events = json.loads(Path(session.session.end_profiling()).read_text())
    runs = _runs(events, sum(1 + warmup + steps for _ in contexts))
    graph = _graph(engine.graph.model_path)
    heads = _heads(graph)
    kinds = _node_kinds(graph, heads)
    profiled = {e["name"].removesuffix("_kernel_time") for _, nodes in runs for e in nodes}
    # Named in the graph but not in the profile (the session's optimizer renamed it): by output width.
    vocab = None if heads & profiled else engine.graph.model.vocab_size
    result: dict[str, Any] = {"model": engine.graph.model.source, "path": str(folder), "threads": threads,
                              "steps": steps, "warmup": warmup, "onnxruntime_version": session.ort.__version__,
                              "lm_head": sorted(heads), "contexts": {}}
    found: set[str] = set()
    for c in contexts:
        mine, runs = runs[1 + warmup:1 + warmup + steps], runs[1 + warmup + steps:]  # skip prefill + warmup
        split = [_split(run, wall, kinds, vocab, found) for run, wall in zip(mine, walls[c])]
        result["contexts"][str(c)] = _mean(split)
    result["lm_head"] = sorted(found)  # the nodes timed as the LM head: empty if none was found
    return result


def _check(engine: Engine, contexts: list[int], steps: int, warmup: int) -> None:
    from edgekit.runtimes.onnxruntime_build import OrtRuntime
    from edgekit.runtimes.registry import get_runtime

    runtime = get_runtime(engine.runtime)
    if not isinstance(runtime, OrtRuntime) or runtime.device != "cpu":
        raise RuntimeUnavailableError(f"{engine.path} runs on {engine.runtime}; the decode profile reads ONNX "
                                      "Runtime's CPU profiler", "profile an export or an ort-cpu build")
    limit = engine.graph.model.max_position_embeddings
    if not contexts or min(contexts) < 1 or steps < 1 or warmup < 0 or max(contexts) + warmup + steps > limit:
        raise ConfigError(f"contexts {contexts} with {warmup} + {steps} steps do not fit the model's {limit} positions",
                          "use positive contexts below the limit and steps >= 1, e.g. contexts 32,512 and 16 steps")


def _open(engine: Engine, threads: int | None, prefix: str) -> Any:
    """The session ``open_engine`` would give, with ONNX Runtime's profiler writing under ``prefix``."""
    from edgekit.runtimes.registry import check_engine_fits, get_runtime

    if engine.kind == "build":
        check_engine_fits(engine)
    return get_runtime(engine.runtime).open(engine, threads=threads, profile_prefix=prefix)


def _decode(session: Any, vocab: int, context: int, steps: int, warmup: int, seed: int) -> list[float]:
    """Prefill, then greedy single-token steps; the wall ms of each counted step (as ``generate`` steps)."""
    prompt = np.random.default_rng(seed).integers(1, vocab, size=context).tolist()
    session.reset(context + warmup + steps)
    token = int(np.argmax(session.last_logits(prompt)))
    walls = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        token = int(np.argmax(session.last_logits([token])))
        if i >= warmup:
            walls.append((time.perf_counter() - start) * 1000)
    return walls


def _runs(events: list[dict[str, Any]], expected: int) -> list[tuple[dict[str, Any], list[dict[str, Any]]]]:
    """(model_run event, its Node events) per session run, in order."""
    from edgekit.errors import InternalError

    runs = sorted((e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"), key=lambda e: e["ts"])
    if len(runs) != expected:
        raise InternalError(f"ONNX Runtime's profile holds {len(runs)} runs, {expected} were made")
    starts = [r["ts"] for r in runs]
    nodes: list[list[dict[str, Any]]] = [[] for _ in runs]
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            i = bisect.bisect_right(starts, event["ts"]) - 1
            if i >= 0 and event["ts"] <= runs[i]["ts"] + runs[i]["dur"]:
                nodes[i].append(event)
    return list(zip(runs, nodes))


def _split(run: tuple[dict[str, Any], list[dict[str, Any]]], wall_ms: float, kinds: dict[str, str],
           vocab: int | None, found: set[str]) -> dict[str, Any]:
    """One step's ms per part (they sum to ``wall_ms``), and the other ops' ms by op type."""
    session_run, nodes = run
    parts = dict.fromkeys(PARTS, 0.0)
    other: dict[str, float] = defaultdict(float)
    for event in nodes:
        name, op = event["name"].removesuffix("_kernel_time"), event["args"].get("op_name", "")
        part = kinds.get(name) or _kind(op, _writes_vocab(event, vocab))
        parts[part] += event["dur"] / 1000
        found.update([name] if part == "lm_head" else [])
        if part == "other":
            other[op] += event["dur"] / 1000
    run_ms = session_run["dur"] / 1000
    parts["graph_overhead"] = max(run_ms - sum(parts.values()), 0.0)
    parts["outside_graph"] = max(wall_ms - run_ms, 0.0)
    return {"step_ms": max(wall_ms, run_ms), "parts_ms": parts, "other_by_op": dict(other)}


def _kind(op: str, writes_vocab: bool) -> str:
    if op in MATMULS:
        return "lm_head" if writes_vocab else "matmuls"
    if op in ATTENTION:
        return "attention"
    return "norms" if op in NORMS else "other"


def _writes_vocab(event: dict[str, Any], vocab: int | None) -> bool:
    """Whether a node's output is a row of logits: a node the optimizer renamed is still found."""
    if vocab is None:
        return False
    shapes = event["args"].get("output_type_shape") or []
    dims = [d for shape in shapes[:1] for d in next(iter(shape.values()), [])]
    return bool(dims) and dims[-1] == vocab


def _mean(split: list[dict[str, Any]]) -> dict[str, Any]:
    count = len(split)
    step = sum(s["step_ms"] for s in split) / count
    parts = {p: sum(s["parts_ms"][p] for s in split) / count for p in PARTS}
    other: dict[str, float] = defaultdict(float)
    for s in split:
        for op, ms in s["other_by_op"].items():
            other[op] += ms / count
    return {"step_ms": step, "parts_ms": parts, "parts_pct": {p: 100 * ms / step for p, ms in parts.items()},
            "other_by_op": dict(sorted(other.items(), key=lambda kv: -kv[1]))}


def lm_head_nodes(model_path: str | Path) -> set[str]:
    """Names of the nodes that make the ``logits`` output: the product that computes them and the
    shape/cast ops between it and the output (the graph is read without its weights)."""
    return _heads(_graph(model_path))


def _heads(graph: Any) -> set[str]:
    producer = {out: node for node in graph.node for out in node.output}
    heads, frontier = set(), ["logits"]
    while frontier:
        node = producer.get(frontier.pop())
        if node is None or node.name in heads:
            continue
        heads.add(node.name)
        if node.op_type in PASS_THROUGH:
            frontier.extend(i for i in node.input[:1] if i)  # the data input, not a shape or a scale
        elif node.op_type not in MATMULS:
            return set()  # logits not made by a product here: leave it to the output-shape test
    return heads


def _node_kinds(graph: Any, heads: set[str]) -> dict[str, str]:
    """Parts known by name from the graph: the LM head's nodes; as attention, what writes the KV
    cache (a concatenating target's present outputs) and the products of two activations (the
    portable target's scores and weighted values: every other product has a weight operand)."""
    kinds = {name: "lm_head" for name in heads}
    constant = {t.name for t in graph.initializer}
    for node in graph.node:  # topological order: a node's inputs are settled before it
        if all(i in constant for i in node.input if i):
            constant.update(node.output)  # Constant, a transposed or dequantized weight, ...
        if any(out.startswith("present") for out in node.output) and node.op_type not in ATTENTION:
            kinds[node.name] = "attention"
        elif node.op_type in ("MatMul", "FusedMatMul") and not any(i in constant for i in node.input):
            kinds.setdefault(node.name, "attention")
    return kinds


def _graph(model_path: str | Path) -> Any:
    import onnx

    return onnx.load(str(model_path), load_external_data=False).graph


LABELS = {"matmuls": "matmuls", "lm_head": "LM head", "attention": "attention", "norms": "norms", "other": "other ops",
          "graph_overhead": "executor", "outside_graph": "outside the graph"}


def check_profile_output(path: str | Path) -> None:
    """Refuse a JSON output path whose folder is missing, or that holds something other than an earlier
    profile (edgekit never overwrites what it did not write); call it before profiling."""
    from edgekit.bench.report import check_replaceable

    check_replaceable(path, _a_profile, "is not a decode profile")


def _a_profile(path: Path) -> bool:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and {"contexts", "lm_head", "onnxruntime_version"} <= data.keys()


def profile_markdown(result: dict[str, Any]) -> str:
    """:func:`profile_decode`'s result as a Markdown table: one row per context, ms (%) per part."""
    lines = [f"{result['model']} · {result['steps']} decode steps after each prefill (mean, {result['warmup']} warmup) "
             f"· threads {result['threads'] or 'default'} · onnxruntime {result['onnxruntime_version']} "
             f"· LM head: {', '.join(result['lm_head']) or 'not found'}", "",
             "| context | step ms | " + " | ".join(LABELS[p] for p in PARTS) + " | top other ops |",
             "|---|---|" + "---|" * (len(PARTS) + 1)]
    for context, row in result["contexts"].items():
        cells = [f"{row['parts_ms'][p]:.3f} ({row['parts_pct'][p]:.1f} %)" for p in PARTS]
        top = ", ".join(f"{op} {ms:.3f}" for op, ms in list(row["other_by_op"].items())[:3])
        lines.append(f"| {context} | {row['step_ms']:.3f} | " + " | ".join(cells) + f" | {top} |")
    return "\n".join(lines) + "\n"
