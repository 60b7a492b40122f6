"""Hybrid Qwen3.5 (Gated DeltaNet + gated attention) on CPU: edgekit's three targets vs PyTorch eager
and, where its builder succeeds, onnxruntime-genai. Contenders alternate within one process.

    python benchmarks/hybrid_qwen3_5.py [--runs 5] [--threads 2] [--genai-python /path/to/python]

Measures 512-token prefill time (time to first token) and decode tokens/s (prompt 32 -> 128 tokens,
greedy), medians over runs, and checks every contender generates the same tokens as PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path


def measure(session, prompt, new_tokens):
    from edgekit.generate import generate

    session.reset(len(prompt) + 1)
    start = time.perf_counter()
    session.forward(prompt)
    prefill_ms = (time.perf_counter() - start) * 1000
    result = generate(session, list(range(1, 33)), new_tokens)
    return prefill_ms, result.decode_tokens_per_s, result.token_ids


def genai_builder(python: str | None, folder: Path, out: Path) -> str:
    """Try onnxruntime-genai's model builder on the same Hugging Face folder; return what happened."""
    if not python:
        return "not run (pass --genai-python with onnxruntime-genai installed)"
    cmd = [python, "-m", "onnxruntime_genai.models.builder", "-m", str(folder), "-o", str(out), "-p", "fp32", "-e", "cpu"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        lines = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        return "builder failed: " + (lines[-1] if lines else f"exit {done.returncode}")
    return "built"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-qwen3.5")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--genai-python", default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from edgekit.export import export_model
    from edgekit.export.resolve import resolve_model
    from edgekit.runtimes.registry import open_engine
    from edgekit.runtimes.torch import TorchSession, load_reference

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    sessions = {}
    for target in ("ort", "portable", "decomposed"):
        export_model(args.model, tmp / target, target=target)
        sessions[f"edgekit {target}"] = open_engine(tmp / target, threads=args.threads)
    sessions["torch eager"] = TorchSession(load_reference(args.model))
    genai = genai_builder(args.genai_python, resolve_model(args.model), tmp / "genai")
    prompt = np.random.default_rng(0).integers(1, 2048, size=512).tolist()
    rows = {name: ([], [], None) for name in sessions}
    for run in range(args.runs + 1):  # round 0 warms up
        for name, session in sessions.items():
            prefill, rate, tokens = measure(session, prompt, args.new_tokens)
            if run:
                rows[name][0].append(prefill)
                rows[name][1].append(rate)
            rows[name] = (rows[name][0], rows[name][1], tokens)
    base = statistics.median(rows["edgekit ort"][0])
    print(f"model {args.model}, {args.threads} threads, median of {args.runs} runs, contenders alternated")
    print(f"| contender | 512-token prefill ms | vs edgekit ort | decode tok/s | same tokens as torch |")
    print("|---|---|---|---|---|")
    for name, (prefill, rate, tokens) in rows.items():
        p = statistics.median(prefill)
        same = tokens == rows["torch eager"][2]
        print(f"| {name} | {p:.1f} | {p / base:.2f}x | {statistics.median(rate):.1f} | {same} |")
    print(f"| onnxruntime-genai | {genai} | | | |")


if __name__ == "__main__":
    main()
