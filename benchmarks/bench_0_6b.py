"""edgekit against PyTorch eager, optimum and onnxruntime-genai on a 0.6B Qwen3-shaped model.

Random weights (seeded) in Qwen3-0.6B's shape: hidden 1024, 28 layers, 16 heads, 8 KV heads,
head_dim 128 (not hidden/heads), intermediate 3072, vocab 151936, tied embeddings. Prompts are
token ids fed directly (the preset tokenizer that makes the folder loadable has 2048 words).

    python benchmarks/bench_0_6b.py [--work DIR] [--peers DIR] [--threads 2] [--runs 3]
                                    [--contenders torch,optimum,genai,genai:int4]

Steps, each printed as the command it runs:
1. save the model with transformers (``save_pretrained``, bf16: half the disk of fp32, and every
   contender computes in fp32 or int4 from the same numbers) plus the preset tokenizer;
2. ``edgekit export FOLDER -o EXPORT --target ort --dtype fp32``, then the two CPU builds edgekit
   runs on a device: ``edgekit build EXPORT --profile cpu-x86-64 --precision fp32`` and
   ``--quant int4`` (the export itself is removed afterwards unless ``--keep-export``);
3. a venv per peer, since they cannot share edgekit's environment: onnxruntime-genai (with
   onnx, onnx-ir, transformers and torch 2.13.0 for its model builder) and optimum-onnx (which
   needs transformers < 4.58);
4. ``edgekit bench BUILD_FP32 --compare edgekit:int4=BUILD_INT4,torch,optimum=PY,genai=PY,genai:int4=PY
   --prompt-lengths 32,512 --new-tokens 128 --runs 3 --warmup 1 --threads 2 -o --plot``, with
   ``EDGEKIT_CACHE=WORK/cache`` (the peers' own exports go there), and the table as Markdown.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))  # the command installed beside this Python
CONFIG = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
              intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=0)
TORCH = "torch==2.13.0"  # the CPU build here; unpinned torch resolves to a multi-GB CUDA build
PEERS = {  # venv name -> (packages, the module that proves the install)
    "genai": (["onnxruntime-genai", "onnx", "onnx-ir", "transformers", TORCH], "onnxruntime_genai"),
    "optimum": (["optimum-onnx[onnxruntime]", "transformers<4.58", TORCH], "optimum.onnxruntime"),
}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Print the command as a shell line, then run it."""
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, **kwargs)


def make_model(folder: Path) -> None:
    """A Qwen3-0.6B-shaped Hugging Face folder with seeded random weights."""
    save_random_model(folder, "Qwen3Config", "Qwen3ForCausalLM", CONFIG)


def save_random_model(folder: Path, config_class: str, architecture: str, config: dict) -> None:
    """transformers' ``architecture`` with seeded random weights, saved in bf16 with the preset tokenizer
    (prompts are token ids fed directly: the tokenizer only makes the folder loadable); kept if there."""
    if (folder / "config.json").is_file():
        return
    import torch
    import transformers

    from edgekit.export.presets import TOKENIZER_DIR

    print(f"# saving a random {architecture} to {folder}", flush=True)
    torch.manual_seed(0)
    made = getattr(transformers, config_class)(**config, architectures=[architecture])
    getattr(transformers, architecture)(made).eval().to(torch.bfloat16).save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, folder / item.name)


def make_peer_venv(peers: Path, name: str) -> tuple[str, str | None]:
    """(python, install error or None) for one peer's venv, created when missing."""
    packages, module = PEERS[name]
    python = peers / name / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", f"import {module}"], capture_output=True).returncode == 0:
        return str(python), None
    run([sys.executable, "-m", "venv", str(peers / name)], check=True)
    result = run([str(python), "-m", "pip", "install", "-q", *packages], capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.startswith("ERROR")] or result.stderr.splitlines()
        return str(python), lines[-1] if lines else f"pip exited {result.returncode}"
    return str(python), None


def make_builds(model: Path, work: Path, keep_export: bool) -> tuple[Path, Path]:
    """(fp32 build, int4 build) of the model for the cpu-x86-64 profile, made when missing."""
    export, fp32, int4 = work / "export-ort-fp32", work / "build-fp32", work / "build-int4"
    missing = [b for b in (fp32, int4) if not (b / "edgekit.json").is_file()]
    if missing and not (export / "edgekit.json").is_file():
        run([EDGEKIT, "export", str(model), "-o", str(export), "--target", "ort", "--dtype", "fp32"], check=True)
    for build, how in ((fp32, ["--precision", "fp32"]), (int4, ["--quant", "int4"])):
        if build in missing:
            run([EDGEKIT, "build", str(export), "--profile", "cpu-x86-64", *how, "-o", str(build)], check=True)
    if not keep_export and export.exists():
        shutil.rmtree(export)  # 2.4 GB the bench does not read
    return fp32, int4


def compare_specs(contenders: list[str], peers: Path, int4: Path) -> list[str]:
    """--compare entries: edgekit's int4 build, then the asked peers (each genai variant in one venv)."""
    specs = [f"edgekit:int4={int4}"]
    pythons: dict[str, str] = {}
    for spec in contenders:
        kind = spec.partition(":")[0]
        if kind == "torch":
            specs.append("torch")
            continue
        if kind not in pythons:
            pythons[kind], error = make_peer_venv(peers, kind)
            if error:
                print(f"# {kind}: the install failed: {error}", flush=True)
        specs.append(f"{spec}={pythons[kind]}")
    return specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgekit-bench-0.6b"))
    parser.add_argument("--peers", type=Path, default=Path("/tmp/edgekit-peers"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--contenders", default="torch,optimum,genai,genai:int4")
    parser.add_argument("--keep-export", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    model = args.work / "qwen3-0.6b-random"
    make_model(model)
    fp32, int4 = make_builds(model, args.work, args.keep_export)
    compare = compare_specs([c.strip() for c in args.contenders.split(",") if c.strip()], args.peers, int4)
    bench = [EDGEKIT, "bench", str(fp32), "--compare", ",".join(compare),
             "--prompt-lengths", "32,512", "--new-tokens", "128", "--runs", str(args.runs), "--warmup", "1",
             "--threads", str(args.threads), "--output", str(args.work / "bench.json"),
             "--plot", str(args.work / "bench.png")]
    print(f"# load average before: {os.getloadavg()}", flush=True)
    run(bench, check=True, env={**os.environ, "EDGEKIT_CACHE": str(args.work / "cache")})
    print(f"# load average after: {os.getloadavg()}", flush=True)
    from edgekit.bench.report import BenchReport, to_markdown

    data = json.loads((args.work / "bench.json").read_text())
    table = to_markdown(BenchReport(data["machine"], data["settings"], tuple(data["contenders"]), data["created"]))
    (args.work / "bench.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
