"""edgekit serve: aggregate decode throughput with 1, 4 and 16 concurrent clients, continuous batching
against the same requests served one at a time (--max-batch 1, FIFO).

    python benchmarks/serve_throughput.py [--export DIR] [--threads 2] [--tokens 256] [--rounds 2]

Without --export, the default tiny preset (tiny-qwen3, ort target) is exported into a temporary
folder first. Each server runs as an `edgekit serve` subprocess on 127.0.0.1; clients are threads
here sending greedy /v1/completions requests with different prompts. Throughput = completion tokens
of all requests / wall time from the first request sent to the last answer received.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(export: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    edgekit = Path(sys.executable).parent / "edgekit"
    cmd = [str(edgekit), "serve", str(export), "--port", str(port), "--max-batch", str(max_batch),
           "--max-context", "512", "--threads", str(threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{root}/health", timeout=1).status_code == 200:
                return proc, root
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not come up in 60 s")


def run_clients(root: str, clients: int, tokens: int) -> tuple[float, int]:
    """(tokens/s, tokens) for ``clients`` concurrent greedy requests."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    with httpx.Client(base_url=root, timeout=600, limits=limits) as http:
        def ask(i: int) -> int:
            body = {"prompt": f"Client {i} asks about topic {i * 7}:", "max_tokens": tokens, "temperature": 0}
            return http.post("/v1/completions", json=body).json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(ask, range(clients)))
        return total / (time.perf_counter() - start), total


def export_default(folder: Path) -> Path:
    out = folder / "tiny-qwen3-ort"
    subprocess.run([str(Path(sys.executable).parent / "edgekit"), "export", "tiny-qwen3", "-o", str(out),
                    "--target", "ort"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--export", type=Path, help="an ort export folder (default: export tiny-qwen3)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads of the server")
    parser.add_argument("--tokens", type=int, default=256, help="max_tokens per request")
    parser.add_argument("--rounds", type=int, default=2, help="runs per cell; the best is reported")
    parser.add_argument("--clients", default="1,4,16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        export = args.export or export_default(Path(tmp))
        counts = [int(c) for c in args.clients.split(",")]
        rows = {}
        for label, max_batch in (("batched (--max-batch 16)", 16), ("one at a time (--max-batch 1)", 1)):
            proc, root = start_server(export, max_batch, args.threads)
            try:
                run_clients(root, 2, 8)  # warm up
                rows[label] = [max(run_clients(root, c, args.tokens)[0] for _ in range(args.rounds)) for c in counts]
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    print(f"cpu cores: {os.cpu_count()} · {args.tokens} tokens per request · threads {args.threads}\n")
    print("| server | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in counts) + " |")
    print("|---|" + "---:|" * len(counts))
    for label, values in rows.items():
        print(f"| {label} | " + " | ".join(f"{v:.0f} tok/s" for v in values) + " |")
    batched, serial = rows.values()
    print("| speed-up | " + " | ".join(f"{b / s:.2f}x" for b, s in zip(batched, serial)) + " |")


if __name__ == "__main__":
    main()
