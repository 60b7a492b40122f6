"""`edgekit run` with its resident memory sampled: anonymous memory vs mapped file pages.

    python benchmarks/mmap_run.py /tmp/edgekit-big/export-int4 --mmap      # memory-mapped weights
    python benchmarks/mmap_run.py /tmp/edgekit-big/export-int4 --no-mmap   # prepacked (a private copy)

/usr/bin/time's peak RSS counts mapped file pages, which the kernel can evict; this samples
/proc/PID/status every 0.5 s and reports the peaks of RssAnon (private memory) and RssFile
(mapped weights) separately, plus run's JSON (tokens, time to first token, decode tokens/s).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

FIELDS = ("RssAnon", "RssFile", "VmRSS")


def sample(pid: int, peak: dict[str, int]) -> None:
    """Raise ``peak``'s fields to the process's current values (bytes)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                key = line.split(":")[0]
                if key in peak:
                    peak[key] = max(peak[key], int(line.split()[1]) * 1024)
    except OSError:
        pass  # the process just ended


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--mmap", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-new-tokens", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    edgekit = str(Path(sys.executable).with_name("edgekit"))
    cmd = [edgekit, "run", str(args.export), "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens",
           str(args.max_new_tokens), "--json", "--threads", str(args.threads), "--mmap" if args.mmap else "--no-mmap"]
    start = time.time()
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = dict.fromkeys(FIELDS, 0)
    while process.poll() is None:
        sample(process.pid, peak)
        time.sleep(0.5)
    out, err = process.communicate()
    run = json.loads(out) if process.returncode == 0 else {"error": err[-800:]}
    print(json.dumps({"command": cmd, "wall_s": round(time.time() - start, 1), "exit_status": process.returncode,
                      "peak_bytes": peak, "run": run}, indent=1))
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
