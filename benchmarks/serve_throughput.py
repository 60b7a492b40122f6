"""edgekit serve under concurrent clients: aggregate tokens/s and time to first token (p50/p99) at 1, 4,
16 and 64 clients, with batched prefill and with one prompt per prefill forward; and the prefix cache's
TTFT ratio (a second request sharing a long prefix with the first, against the first).

    python benchmarks/serve_throughput.py                       # exports tiny-qwen3 first, all defaults
    python benchmarks/serve_throughput.py --export DIR --clients 1,4,16,64 --rounds 3

Each server is an `edgekit serve` subprocess on 127.0.0.1; clients are threads here, each sending one
streaming greedy /v1/completions request whose prompt is a list of token ids (random, different per
client, --prompt-tokens long), all at once. TTFT = from sending the request to its first text chunk;
throughput = completion tokens of all requests / wall time of the round. The throughput servers run
with --prefix-cache-mb 0 (distinct prompts: nothing to reuse; keeps the comparison to prefill alone).
Prefix cache: per round a fresh random --prefix-tokens prefix; request 1 = prefix + question A, then
request 2 = prefix + question B; ratio = TTFT 2 / TTFT 1, median over rounds, cache on and off.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

VOCAB = (10, 1000)  # token ids the prompts draw from: inside every preset's vocabulary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, threads: int, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    edgekit = Path(sys.executable).parent / "edgekit"
    cmd = [str(edgekit), "serve", str(export), "--port", str(port), "--threads", str(threads), *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return proc, root
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not come up in 120 s: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def ask(http: httpx.Client, prompt: list[int], tokens: int) -> tuple[float, int]:
    """One streaming greedy request -> (seconds to its first text chunk, completion tokens)."""
    body = {"prompt": prompt, "max_tokens": tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start, first, used = time.perf_counter(), None, 0
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and any(c.get("text") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            used = (chunk.get("usage") or {}).get("completion_tokens", used)
    return (first if first is not None else time.perf_counter() - start), used


def first_token(http: httpx.Client, prompt: list[int]) -> float:
    """Seconds until a one-token greedy completion of ``prompt`` returns: its time to first token,
    whatever that token's text (a random-weight model may pick ids the tokenizer decodes to nothing,
    which a first *text* chunk would wait past)."""
    start = time.perf_counter()
    response = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
    response.raise_for_status()
    return time.perf_counter() - start


def random_prompt(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def run_clients(root: str, clients: int, tokens: int, prompt_tokens: int, seed: int) -> tuple[float, list[float]]:
    """``clients`` concurrent requests -> (aggregate tokens/s, every request's TTFT)."""
    rng = random.Random(seed)
    prompts = [random_prompt(rng, prompt_tokens) for _ in range(clients)]
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=root, timeout=600, limits=limits) as http:
        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results = list(pool.map(lambda p: ask(http, p, tokens), prompts))
        wall = time.perf_counter() - start
    return sum(n for _, n in results) / wall, [t for t, _ in results]


def prefix_ratio(root: str, rounds: int, prefix_tokens: int) -> tuple[float, float, float]:
    """Median (TTFT first, TTFT second, second / first) over rounds, each with a fresh shared prefix."""
    rng = random.Random(1234)
    firsts, seconds, ratios = [], [], []
    with httpx.Client(base_url=root, timeout=600) as http:
        for _ in range(rounds):
            prefix = random_prompt(rng, prefix_tokens)
            one = first_token(http, prefix + random_prompt(rng, 16))
            two = first_token(http, prefix + random_prompt(rng, 16))
            firsts.append(one)
            seconds.append(two)
            ratios.append(two / one)
    return statistics.median(firsts), statistics.median(seconds), statistics.median(ratios)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def export_default(folder: Path, preset: str) -> Path:
    out = folder / f"{preset}-ort"
    subprocess.run([str(Path(sys.executable).parent / "edgekit"), "export", preset, "-o", str(out),
                    "--target", "ort"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def throughput_table(args, export: Path, counts: list[int]) -> list[str]:
    configs = (("batched prefill", []), ("one prompt per prefill forward", ["--prefill-batch", "1"]))
    lines = ["| server | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for label, flags in configs:
        base = ["--max-batch", str(max(counts)), "--max-context", str(args.max_context), "--prefix-cache-mb", "0"]
        proc, root = start_server(export, args.threads, base + flags)
        try:
            run_clients(root, 2, 4, 8, seed=0)  # warm up
            cells = []
            for c in counts:
                rounds = [run_clients(root, c, args.tokens, args.prompt_tokens, seed=r) for r in range(args.rounds)]
                ttfts = [t for _, ts in rounds for t in ts]
                cells.append(f"{max(r for r, _ in rounds):.0f} tok/s · TTFT p50 {percentile(ttfts, 0.5) * 1e3:.0f} ms"
                             f" / p99 {percentile(ttfts, 0.99) * 1e3:.0f} ms")
        finally:
            stop(proc)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def prefix_table(args, export: Path) -> list[str]:
    lines = ["| prefix cache | TTFT request 1 | TTFT request 2 | ratio (median) |", "|---|---:|---:|---:|"]
    for label, mb in (("on (--prefix-cache-mb 512)", "512"), ("off (--prefix-cache-mb 0)", "0")):
        flags = ["--max-batch", "4", "--max-context", str(args.max_context), "--prefix-cache-mb", mb]
        proc, root = start_server(export, args.threads, flags)
        try:
            run_clients(root, 1, 4, 8, seed=0)  # warm up
            one, two, ratio = prefix_ratio(root, args.rounds * 3, args.prefix_tokens)
        finally:
            stop(proc)
        lines.append(f"| {label} | {one * 1e3:.1f} ms | {two * 1e3:.1f} ms | {ratio:.2f}x |")
    return lines


def prefill_table(args, export: Path, counts: list[int]) -> list[str]:
    """The engine alone (no HTTP): k prompts prefilled one per forward vs by ``prefill_rows`` (batched
    where exact), equal lengths and lengths spread over 0.75..1 x; best of --rounds, in ms."""
    from edgekit.runtimes.registry import open_engine
    from edgekit.serve.engine import BatchedEngine

    length = args.prompt_tokens
    engine = BatchedEngine(open_engine(export, threads=args.threads), max(counts), length + 8)
    rng = random.Random(7)
    engine.prefill_rows(0, [random_prompt(rng, length)])  # warm up (first-run allocations)
    lines = ["| prompts | one per forward | batched, equal lengths | one per forward, 0.75..1 x | batched, 0.75..1 x |",
             "|---:|---:|---:|---:|---:|"]

    def best(run) -> float:
        times = []
        for _ in range(max(args.rounds, 2)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return min(times) * 1e3

    for k in counts:
        equal = [random_prompt(rng, length) for _ in range(k)]
        spread = [random_prompt(rng, rng.randint(int(0.75 * length), length)) for _ in range(k)]
        cells = []
        for prompts in (equal, spread):
            cells.append(best(lambda: [engine.prefill_rows(i, [p]) for i, p in enumerate(prompts)]))
            cells.append(best(lambda: engine.prefill_rows(0, prompts)))
        lines.append(f"| {k} x {length} | " + " | ".join(f"{c:.1f} ms" for c in cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="an ort export folder (default: export --preset)")
    parser.add_argument("--preset", default="tiny-qwen3", help="what to export without --export")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the server")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--prompt-tokens", type=int, default=128, help="prompt length of the throughput runs")
    parser.add_argument("--prefix-tokens", type=int, default=512, help="shared prefix of the prefix-cache runs")
    parser.add_argument("--max-context", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2, help="rounds per cell (tok/s: best; TTFT: all pooled)")
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--tables", default="throughput,prefix,prefill",
                        help="which tables: throughput (HTTP), prefix (cache TTFT ratio), prefill (engine alone)")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    tables = args.tables.split(",")
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or export_default(Path(tmp), args.preset)
        if "throughput" in tables:
            out += ["## clients", "", *throughput_table(args, export, counts), ""]
        if "prefix" in tables:
            out += [f"## prefix cache: {args.prefix_tokens} shared tokens + 16 different ones", "",
                    *prefix_table(args, export), ""]
        if "prefill" in tables:
            out += ["## prefill of prompts joining together (engine, no HTTP)", "",
                    *prefill_table(args, export, counts)]
    print(f"cpu cores: {os.cpu_count()} · {export.name} · {args.tokens} tokens per request · "
          f"prompts {args.prompt_tokens} tokens · threads {args.threads}\n")
    print("\n".join(out))


if __name__ == "__main__":
    main()
