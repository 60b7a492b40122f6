"""Speculative decoding against plain decoding, side by side in one run: prompt lookup, a draft model, MTP.

    python benchmarks/speculative.py [--work DIR] [--new-tokens 128] [--runs 3] [--threads N] [--skip-0-6b] [--quick]

Cases (each: plain greedy, then the speculative variant, alternating per run on the same session):
- ``tiny-code`` (trained Qwen3) and ``tiny-code-mtp`` (trained Qwen3.5 with its MTP head): prompt lookup
  on code-editing prompts (a held-out function, then the instruction to rewrite it with one name changed:
  most of the answer is in the prompt); MTP at k = 1 and 2; tiny-code as a draft for tiny-code-mtp.
- the Qwen3-0.6B shape (random weights, benchmarks/bench_0_6b.py's folder): prompt lookup, and the cost
  of one verify forward of k + 1 tokens against a one-token step (random weights do not copy the prompt,
  so there the acceptance is the model's, and the cost ratio is the ceiling a real 0.6B reaches).
Greedy output is checked identical to plain decoding in every case (the script fails otherwise).
Writes benchmarks/results/speculative.json and prints the Markdown table for SPECULATIVE.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EDGEKIT = str(Path(sys.executable).with_name("edgekit"))


def export(model: str, out: Path, *extra: str) -> Path:
    """``edgekit export MODEL -o OUT`` once (kept between runs)."""
    if not (out / "edgekit.json").is_file():
        command = [EDGEKIT, "export", model, "-o", str(out), "--force", *extra]
        print("$", " ".join(command), flush=True)
        subprocess.run(command, check=True)
    return out


def editing_prompts(tokenizer, count: int, code_tokens: int) -> list[list[int]]:
    """Held-out functions followed by "the same with NAME renamed", then the function's first line again."""
    from edgekit.export.presets import TRAINED

    import textwrap

    lines = (TRAINED["tiny-code"] / "heldout.txt").read_text().splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("def ")]
    blocks = [textwrap.dedent("\n".join(lines[a:b])) for a, b in zip(starts, starts[1:])]
    blocks = [b for b in blocks if len(b) > 200][:count]
    prompts = []
    for code in blocks:
        ids = tokenizer.encode(code)[:code_tokens]
        code = tokenizer.decode(ids)
        name = code.split("(")[0].removeprefix("def ").strip()
        edited = f"\n\n# The same function, renamed to {name}_v2:\n" + code.splitlines()[0].replace(name, f"{name}_v2", 1)
        prompts.append(tokenizer.encode(code + edited))
    return prompts


def measure(session, prompts, new_tokens: int, runs: int, proposer_factory, k: int) -> dict:
    """Median decode tokens/s of plain and speculative greedy over ``runs`` x ``prompts``, alternating."""
    from edgekit.generate import generate
    from edgekit.speculative import generate_speculative

    plain, spec, proposed, accepted, steps = [], [], 0, 0, 0
    for _ in range(runs):
        for prompt in prompts:
            base = generate(session, prompt, new_tokens)
            fast = generate_speculative(session, prompt, new_tokens, proposer_factory(session), k)
            if fast.token_ids != base.token_ids:
                raise SystemExit(f"speculative output differs from plain greedy on a {len(prompt)}-token prompt")
            plain.append(base.decode_tokens_per_s)
            spec.append(fast.decode_tokens_per_s)
            proposed, accepted, steps = proposed + fast.proposed, accepted + fast.accepted, steps + fast.rounds
    p, s = statistics.median(plain), statistics.median(spec)
    return {"plain_tok_s": round(p, 1), "speculative_tok_s": round(s, 1), "speedup": round(s / p, 2),
            "acceptance_rate": round(accepted / proposed, 3) if proposed else 0.0,
            "mean_accepted": round(accepted / steps, 2) if steps else 0.0, "k": k}


def verify_cost(session, context: int, ks=(1, 2, 4, 8), repeats: int = 5) -> dict:
    """Median ms of one forward of k + 1 tokens at ``context`` cached tokens, over a one-token step."""
    ids = list(range(10, 10 + context))
    out = {}
    for k in (0, *ks):
        times = []
        for _ in range(repeats):
            session.reset(context + 16)
            session.forward(ids)
            session.checkpoint()
            start = time.perf_counter()
            session.forward(list(range(20, 21 + k)))
            times.append((time.perf_counter() - start) * 1000)
        out[k] = statistics.median(times)
    return {f"k={k}": round(ms / out[0], 2) for k, ms in out.items() if k}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgekit-bench" / "speculative")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--skip-0-6b", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that checks the script works")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.runs, args.prompts, args.skip_0_6b = 16, 1, 1, True
    from edgekit.runtimes.registry import open_engine
    from edgekit.speculative.draft import DraftProposer
    from edgekit.speculative.mtp import open_mtp
    from edgekit.speculative.ngram import NgramProposer
    from edgekit.tokenizer import load_tokenizer

    work = args.work
    code = open_engine(export("tiny-code", work / "tiny-code"), threads=args.threads)
    mtp = open_engine(export("tiny-code-mtp", work / "tiny-code-mtp", "--mtp"), threads=args.threads)
    prompts = editing_prompts(load_tokenizer(code.graph), args.prompts, 200)
    n, runs = args.new_tokens, args.runs
    results = {
        "tiny-code · prompt lookup k=4": measure(code, prompts, n, runs, lambda s: NgramProposer(), 4),
        "tiny-code-mtp · prompt lookup k=4": measure(mtp, prompts, n, runs, lambda s: NgramProposer(), 4),
        "tiny-code-mtp · MTP k=1": measure(mtp, prompts, n, runs, open_mtp, 1),
        "tiny-code-mtp · MTP k=2": measure(mtp, prompts, n, runs, open_mtp, 2),
        "tiny-code-mtp · draft tiny-code k=3": measure(
            mtp, prompts, n, runs, lambda s: DraftProposer(open_engine(work / "tiny-code", threads=args.threads)), 3),
    }
    if not args.skip_0_6b:
        sys.path.insert(0, str(HERE))
        from bench_0_6b import make_model

        make_model(work / "qwen3-0.6b")
        big = open_engine(export(str(work / "qwen3-0.6b"), work / "qwen3-0.6b-export"), threads=args.threads)
        results["Qwen3-0.6B shape · prompt lookup k=4"] = measure(big, prompts, n, runs, lambda s: NgramProposer(), 4)
        results["Qwen3-0.6B shape · verify forward / 1-token step"] = verify_cost(big, 300)
    settings = {"new_tokens": n, "runs": runs, "prompts": len(prompts), "threads": args.threads}
    if not args.quick:  # a quick run's figures mean nothing: not written where the results live
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "speculative.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2))
    print(markdown(results))


def markdown(results: dict) -> str:
    lines = ["| case | plain tok/s | speculative tok/s | speedup | acceptance | accepted / step |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        if "plain_tok_s" in r:
            lines.append(f"| {name} | {r['plain_tok_s']} | {r['speculative_tok_s']} | {r['speedup']}x | "
                         f"{r['acceptance_rate']} | {r['mean_accepted']} |")
        else:
            lines.append(f"| {name} | " + ", ".join(f"{k}: {v}x" for k, v in r.items()) + " | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
