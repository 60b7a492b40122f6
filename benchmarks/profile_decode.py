"""Where a decode step's time goes: ONNX Runtime's profiler over single-token steps, per context.

    python benchmarks/profile_decode.py FOLDER [--contexts 32,512] [--steps 16] [--threads 2]
                                        [--warmup 2] [--json FILE]

FOLDER is an export or an ort-cpu build. For each context C: a random prompt of C tokens is
prefilled, then ``--warmup`` steps run uncounted and ``--steps`` single-token steps are timed;
each step's wall time is split, from the profile's events, into matmuls, the LM head, attention
(with the KV-cache writes), norms, other ops, the executor between kernels and what happens outside
the graph (Python, IO binding, copies, the argmax). Prints a Markdown table (ms and % per step);
``--json`` also writes the numbers. See :mod:`edgekit.bench.profile_step`.

Run it on a quiet machine: another process on the same cores moves every part.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an export or an ort-cpu build folder")
    parser.add_argument("--contexts", default="32,512", help="prompt lengths before the decode steps, comma separated")
    parser.add_argument("--steps", type=int, default=16, help="timed single-token steps per context")
    parser.add_argument("--warmup", type=int, default=2, help="steps run first after each prefill, not counted")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: ONNX Runtime's)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the result as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
    from edgekit.bench.profile_step import check_profile_output, profile_decode, profile_markdown
    from edgekit.errors import EdgekitError

    try:
        contexts = [int(c) for c in args.contexts.split(",") if c.strip()]
    except ValueError:
        print(f"error: --contexts {args.contexts!r} is not a comma-separated list of integers\nhint: e.g. --contexts 32,512",
              file=sys.stderr)
        return 1
    try:
        if args.json is not None:
            check_profile_output(args.json)  # before the profile runs: a refused path costs no minutes
        result = profile_decode(args.folder, contexts, args.steps, args.threads, args.warmup)
    except EdgekitError as exc:
        print(f"error: {exc.message}" + (f"\nhint: {exc.hint}" if exc.hint else ""), file=sys.stderr)
        return 1
    print(profile_markdown(result), end="")
    if args.json is not None:
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text(json.dumps(result, indent=2) + "\n")
        partial.replace(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
