"""First ratio: decode tokens/s of edgekit (ONNX Runtime, both targets) vs PyTorch eager.

Same model, same prompt, same greedy tokens; contenders alternate within one process so
drift hits all alike; medians over runs. The full benchmark is `edgekit bench` (its own issue).

    python benchmarks/decode_vs_torch.py [MODEL] [--new-tokens 128] [--runs 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?", default="tiny-qwen3")
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from edgekit.export import export_model
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine
    from edgekit.runtimes.torch import TorchSession, load_reference

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp())
    sessions = {"torch eager": TorchSession(load_reference(args.model))}
    for target in ("ort", "portable"):
        export_model(args.model, tmp / target, target=target)
        sessions[f"edgekit {target}"] = open_engine(tmp / target, threads=args.threads)
    prompt = list(range(1, args.prompt_length + 1))
    rates: dict[str, list[float]] = {name: [] for name in sessions}
    ttft: dict[str, list[float]] = {name: [] for name in sessions}
    tokens = {}
    for _ in range(args.runs + 1):  # the first round warms up
        for name, session in sessions.items():
            result = generate(session, prompt, args.new_tokens)
            rates[name].append(result.decode_tokens_per_s)
            ttft[name].append(result.ttft_ms)
            tokens[name] = result.token_ids
    base = statistics.median(rates["torch eager"][1:])
    print(f"model {args.model}, prompt {args.prompt_length}, {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.runs}")
    print(f"{'contender':<18}{'decode tok/s':>14}{'vs torch':>10}{'TTFT ms':>10}{'same tokens':>13}")
    for name in sessions:
        rate = statistics.median(rates[name][1:])
        same = tokens[name] == tokens["torch eager"]
        print(f"{name:<18}{rate:>14.1f}{rate / base:>9.2f}x{statistics.median(ttft[name][1:]):>10.2f}{str(same):>13}")


if __name__ == "__main__":
    main()
