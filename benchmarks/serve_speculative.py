"""``edgekit serve --speculative ngram`` against plain serving, side by side in one run, one client.

    python benchmarks/serve_speculative.py [--work DIR] [--new-tokens 96] [--tiny-tokens 384] [--rounds 3]
                                           [--threads N] [--skip-0-6b]

Per model (the trained ``tiny-code`` preset; the random Qwen3-0.6B shape of bench_0_6b.py unless
--skip-0-6b), two ``edgekit serve`` subprocesses are up at once, plain and ``--speculative ngram``
(only the one answering works; no prefix cache); each round sends greedy /v1/completions requests per
code-editing prompt (benchmarks/speculative.py's) to each, alternating. Decode tokens/s = (tokens - 1)
/ (the reply's time - a one-token reply's time), client-side (the random 0.6B's tokens decode to no
text, so chunks cannot be timed); the replies' token ids must be identical (the script fails otherwise).

Then why a batch does not speculate: on the batched engine, at a cached context of 300 tokens, the
time of one decode step of 2 rows against 2 single-row verify forwards of k + 1 tokens (what
speculating rows would cost: GroupQueryAttention takes several tokens per row for one row alone).
Writes benchmarks/results/serve_speculative.json and prints the Markdown for SPECULATIVE.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from serve_throughput import start_server, stop  # noqa: E402
from speculative import editing_prompts, export  # noqa: E402


def ask(root: str, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """One greedy completion: (its token ids, seconds from sending to the whole reply)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "return_token_ids": True}
    start = time.perf_counter()
    reply = httpx.post(f"{root}/v1/completions", json=body, timeout=600)
    reply.raise_for_status()
    return reply.json()["choices"][0]["token_ids"], time.perf_counter() - start


def decode_speed(root: str, prompt: list[int], tokens: int) -> tuple[list[int], float]:
    """(token ids, decode tokens/s): the reply's time less a one-token reply's (prompt and first token)."""
    _, first = ask(root, prompt, 1)
    ids, total = ask(root, prompt, tokens)
    return ids, (len(ids) - 1) / (total - first)


def compare(export_dir: Path, prompts: list[list[int]], tokens: int, rounds: int, threads: int) -> dict:
    servers = {name: start_server(export_dir, threads, flags) for name, flags in
               (("plain", ["--prefix-cache-mb", "0"]), ("speculative", ["--prefix-cache-mb", "0", "--speculative", "ngram"]))}
    speeds: dict[str, list[float]] = {name: [] for name in servers}
    try:
        for _ in range(rounds):
            for prompt in prompts:
                texts = {}
                for name, (_, root) in servers.items():
                    texts[name], speed = decode_speed(root, prompt, tokens)
                    speeds[name].append(speed)
                if texts["plain"] != texts["speculative"]:
                    raise SystemExit(f"{export_dir.name}: the speculative reply differs from the plain one")
        root = servers["speculative"][1]
        metrics = httpx.get(f"{root}/metrics").text
    finally:
        for proc, _ in servers.values():
            stop(proc)
    count = {what: _sample(metrics, f"edgekit_speculative_{what}_tokens_total") for what in ("proposed", "accepted")}
    plain, fast = statistics.median(speeds["plain"]), statistics.median(speeds["speculative"])
    return {"plain_tok_s": round(plain, 1), "speculative_tok_s": round(fast, 1), "speedup": round(fast / plain, 2),
            "acceptance_rate": round(count["accepted"] / count["proposed"], 3) if count["proposed"] else 0.0}


def _sample(text: str, name: str) -> float:
    return next(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def batch_cost(export_dir: Path, threads: int, context: int = 300, k: int = 4, repeats: int = 7) -> dict:
    """ms of a 2-row decode step, and of 2 single-row verify forwards of k + 1 tokens, at ``context``."""
    from edgekit.serve.engine import serving_engine
    from edgekit.types import ExportedGraph

    engine, _ = serving_engine(ExportedGraph.load(export_dir), max_batch=2, max_context=context + 16,
                               threads=threads, prefix_cache_bytes=0)
    ids = list(range(10, 10 + context))
    for row in (0, 1):
        engine.prefill(row, ids)
    step, verify = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        engine.decode([20, 21], [context, context])
        step.append(time.perf_counter() - start)
        start = time.perf_counter()
        for row in (0, 1):
            engine.verify(row, list(range(30, 31 + k)), context, k + 1)
        verify.append(time.perf_counter() - start)
    a, b = statistics.median(step) * 1000, statistics.median(verify) * 1000
    return {"decode_2_rows_ms": round(a, 2), "two_verifies_ms": round(b, 2), "ratio": round(b / a, 2), "k": k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgekit-bench" / "speculative")
    parser.add_argument("--new-tokens", type=int, default=96, help="per reply of the 0.6B shape")
    parser.add_argument("--tiny-tokens", type=int, default=384,
                        help="per reply of tiny-code (at ~1000 tok/s fewer are within HTTP jitter)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--skip-0-6b", action="store_true")
    args = parser.parse_args()
    from edgekit.tokenizer import load_tokenizer
    from edgekit.types import ExportedGraph

    models = {"tiny-code": export("tiny-code", args.work / "tiny-code")}
    if not args.skip_0_6b:
        from bench_0_6b import make_model

        make_model(args.work / "qwen3-0.6b")
        models["Qwen3-0.6B shape"] = export(str(args.work / "qwen3-0.6b"), args.work / "qwen3-0.6b-export")
    prompts = editing_prompts(load_tokenizer(ExportedGraph.load(models["tiny-code"])), args.prompts, 200)
    load_before = os.getloadavg()
    tokens = {"tiny-code": args.tiny_tokens, "Qwen3-0.6B shape": args.new_tokens}
    results = {name: compare(folder, prompts, tokens[name], args.rounds, args.threads) for name, folder in models.items()}
    results.update({f"{name} · 2 rows: decode step vs 2 verifies": batch_cost(folder, args.threads)
                    for name, folder in models.items()})
    settings = {"new_tokens": tokens, "rounds": args.rounds, "prompts": len(prompts), "threads": args.threads,
                "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "serve_speculative.json").write_text(json.dumps({"settings": settings, "results": results},
                                                                        indent=2))
    print(json.dumps(settings))
    for name, row in results.items():
        print(f"| {name} | " + " | ".join(f"{k}: {v}" for k, v in row.items()) + " |")


if __name__ == "__main__":
    main()
