"""Speculative decoding against plain decoding, side by side in one run: prompt lookup, a draft model, MTP.

    python benchmarks/speculative.py [--work DIR] [--new-tokens 128] [--runs 3] [--threads N] [--skip-0-6b] [--quick]

Cases (each: plain greedy, then the speculative variant, alternating per run):
- ``tiny-code`` (trained Qwen3) and ``tiny-code-mtp`` (trained Qwen3.5 with its MTP head): prompt lookup
  on code-editing prompts (a held-out function, then the instruction to rewrite it with one name changed:
  most of the answer is in the prompt); MTP (``export --mtp``: the head inside the graph) against plain
  decoding of the export without the head, and of the same export; tiny-code as a draft for tiny-code-mtp.
- the Qwen3-0.6B shape (random weights, benchmarks/bench_0_6b.py's folder): prompt lookup, and the cost
  of one verify forward of k + 1 tokens against a one-token step (random weights do not copy the prompt,
  so there the acceptance is the model's, and the cost ratio is the ceiling a real 0.6B reaches).
- the Qwen3.5-0.8B shape with a random MTP head, int4 (``--skip-0-8b`` to leave out): what an MTP round
  (a 2-token forward of the export with the head) costs against a plain step of the export without it,
  at 300 cached tokens; with the trained preset's acceptance a this gives the speedup (1 + a) / cost a
  trained 0.8B-shaped model would reach (random weights make acceptance meaningless, not the cost).
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


def heldout_windows(tokenizer, count: int, length: int) -> list[list[int]]:
    """Up to ``count`` windows of ``length`` tokens of the held-out Python source, ``length`` tokens apart."""
    from edgekit.export.presets import TRAINED

    ids = tokenizer.encode((TRAINED["tiny-code"] / "heldout.txt").read_text())
    starts = range(0, max(0, len(ids) - length + 1), 2 * length)
    return [ids[start:start + length] for start in starts][:count]


def measure(session, prompts, new_tokens: int, runs: int, proposer_factory, k: int, plain_session=None) -> dict:
    """Median decode tokens/s of plain (on ``plain_session``, default ``session``) and speculative greedy
    over ``runs`` x ``prompts``, alternating."""
    from edgekit.generate import generate
    from edgekit.speculative import generate_speculative

    plain, spec, proposed, accepted, steps = [], [], 0, 0, 0
    for _ in range(runs):
        for prompt in prompts:
            base = generate(plain_session or session, prompt, new_tokens)
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


def mtp_round_cost(plain, head, context: int = 300, repeats: int = 21) -> float:
    """Median ms of a 2-token forward on ``head`` (an export with its MTP head: one MTP round) over a
    1-token step on ``plain`` (the export without it), both at ``context`` cached tokens, alternated
    (each step rolled back to the prefilled context)."""
    ids = list(range(10, 10 + context))
    for session in (plain, head):
        session.reset(context + 16)
        session.forward(ids)
    times = {"plain": [], "head": []}
    for _ in range(repeats):
        for name, session, fed in (("plain", plain, [20]), ("head", head, [20, 21])):
            session.checkpoint()
            start = time.perf_counter()
            session.forward(fed)
            times[name].append((time.perf_counter() - start) * 1000)
            session.rollback(context)
    return round(statistics.median(times["head"]) / statistics.median(times["plain"]), 3)


def make_mtp_model(folder: Path) -> Path:
    """The Qwen3.5-0.8B shape (bench_vs_llamacpp.py) with a seeded random MTP head saved as mtp.* tensors."""
    if (folder / "mtp.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    from edgekit.export.mtp import MtpHead

    sys.path.insert(0, str(HERE))
    from bench_vs_llamacpp import make_qwen3_5_08b

    make_qwen3_5_08b(folder)
    config = json.loads((folder / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    import transformers

    torch.manual_seed(1)
    head = MtpHead(transformers.AutoConfig.from_pretrained(folder)).to(torch.bfloat16)
    save_file({f"mtp.{k}": v.contiguous() for k, v in head.state_dict().items()}, str(folder / "mtp.safetensors"),
              {"format": "pt"})
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache" / "edgekit-bench" / "speculative")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--skip-0-6b", action="store_true")
    parser.add_argument("--skip-0-8b", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a tiny setting that checks the script works")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.runs, args.prompts, args.skip_0_6b, args.skip_0_8b = 16, 1, 1, True, True
    from edgekit.runtimes.registry import open_engine
    from edgekit.speculative.draft import DraftProposer
    from edgekit.speculative.mtp import open_mtp
    from edgekit.speculative.ngram import NgramProposer
    from edgekit.tokenizer import load_tokenizer

    work = args.work
    code = open_engine(export("tiny-code", work / "tiny-code"), threads=args.threads)
    hybrid = open_engine(export("tiny-code-mtp", work / "tiny-code-mtp-plain"), threads=args.threads)
    mtp = open_engine(export("tiny-code-mtp", work / "tiny-code-mtp-head", "--mtp"), threads=args.threads)
    narrow = open_engine(export("tiny-code-mtp", work / "tiny-code-mtp-head1024", "--mtp", "--mtp-vocab", "1024"),
                         threads=args.threads)
    tokenizer = load_tokenizer(code.graph)
    prompts = editing_prompts(tokenizer, args.prompts, 200) + heldout_windows(tokenizer, args.prompts, 100)
    n, runs = args.new_tokens, args.runs
    results = {
        "tiny-code · prompt lookup k=4": measure(code, prompts, n, runs, lambda s: NgramProposer(), 4),
        "tiny-code-mtp · prompt lookup k=4": measure(hybrid, prompts, n, runs, lambda s: NgramProposer(), 4),
        "tiny-code-mtp · MTP vs plain without the head": measure(mtp, prompts, n, runs, open_mtp, 1, hybrid),
        "tiny-code-mtp · MTP vs plain of the same export": measure(mtp, prompts, n, runs, open_mtp, 1),
        "tiny-code-mtp · MTP --mtp-vocab 1024 vs plain without the head": measure(
            narrow, prompts, n, runs, open_mtp, 1, hybrid),
        "tiny-code-mtp · draft tiny-code k=3": measure(
            hybrid, prompts, n, runs, lambda s: DraftProposer(open_engine(work / "tiny-code", threads=args.threads)), 3),
    }
    if not args.skip_0_6b:
        sys.path.insert(0, str(HERE))
        from bench_0_6b import make_model

        make_model(work / "qwen3-0.6b")
        big = open_engine(export(str(work / "qwen3-0.6b"), work / "qwen3-0.6b-export"), threads=args.threads)
        results["Qwen3-0.6B shape · prompt lookup k=4"] = measure(big, prompts, n, runs, lambda s: NgramProposer(), 4)
        results["Qwen3-0.6B shape · verify forward / 1-token step"] = verify_cost(big, 300)
    if not args.skip_0_8b:
        model = str(make_mtp_model(work / "qwen3_5-0.8b-mtp"))
        plain = open_engine(export(model, work / "qwen3_5-0.8b-int4", "--quant", "int4"), threads=args.threads)
        a = results["tiny-code-mtp · MTP vs plain without the head"]["acceptance_rate"]
        for label, extra in (("", ()), (" --mtp-vocab 32768", ("--mtp-vocab", "32768"))):
            name = "qwen3_5-0.8b-int4-mtp" + ("32k" if extra else "")
            head = open_engine(export(model, work / name, "--quant", "int4", "--mtp", *extra), threads=args.threads)
            cost = mtp_round_cost(plain, head)
            results[f"Qwen3.5-0.8B shape int4 · MTP{label} round / plain step"] = {
                "cost": cost, "at_acceptance": a, "projected_speedup": round((1 + a) / cost, 2)}
            head.close()
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
        elif "cost" in r:
            lines.append(f"| {name} | cost {r['cost']}x a step | projected {r['projected_speedup']}x | | "
                         f"{r['at_acceptance']} (tiny-code-mtp's) | |")
        else:
            lines.append(f"| {name} | " + ", ".join(f"{k}: {v}x" for k, v in r.items()) + " | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
