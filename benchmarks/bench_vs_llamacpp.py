"""edgekit against llama.cpp on CPU, side by side in one `edgekit bench` run per model.

    python benchmarks/bench_vs_llamacpp.py --llamacpp /tmp/llamacpp/build/bin [--models qwen3-0.6b,qwen3_5-0.8b]
                                           [--work /tmp/edgekit-vs-llamacpp] [--runs 3] [--threads 2]

For each model (seeded random weights, bf16, the preset tokenizer; prompts are token ids fed
directly, so the tokenizer only makes the folder loadable):

1. the Hugging Face folder: ``qwen3-0.6b`` is Qwen3-0.6B's shape (bench_0_6b.py), ``qwen3_5-0.8b``
   Qwen3.5-0.8B's text model (hybrid: 18 Gated DeltaNet + 6 gated-attention layers);
2. edgekit's export and its CPU builds: fp32; int4 with the profile's defaults; int4 ``--symmetric``
   (no zero points, Q4_0's form) and ``--symmetric --lm-head-bits 8`` (Q4_0's quality, its 8-bit table);
3. ``edgekit bench BUILD-fp32 --compare edgekit:int4=BUILD-int4,edgekit:int4-sym=...,edgekit:int4-sym-head8=...,
   llamacpp:f32=BIN,llamacpp:Q4_0=BIN --prompt-lengths 1,512 --new-tokens 128 --runs N --warmup 1
   --threads T``: decode after a one-token
   prompt (llama-bench's tg128), 512-token prefill (pp512), contenders alternating in each round; the
   llama.cpp contenders convert the same folder with their own tree's converter (cached);
4. the table as Markdown (WORK/MODEL/bench.md), with the load average before and after: a run
   under load average > 1.5 on 2 cores is not a measurement (it is marked).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

EDGEKIT = str(Path(sys.executable).with_name("edgekit"))
HERE = Path(__file__).parent
QWEN3_5_08B = dict(  # Qwen3.5-0.8B's text model
    hidden_size=1024, num_hidden_layers=24, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2,
    head_dim=256, linear_num_key_heads=16, linear_num_value_heads=16, linear_key_head_dim=128,
    linear_value_head_dim=128, linear_conv_kernel_dim=4, full_attention_interval=4, vocab_size=248320,
    tie_word_embeddings=True, max_position_embeddings=4096, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
    pad_token_id=0, rope_parameters={"rope_type": "default", "rope_theta": 10_000_000.0,
                                     "partial_rotary_factor": 0.25, "mrope_section": [11, 11, 10]})
LOADED = 1.5  # load average above which a 2-core run is not a measurement


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    """Print the command as a shell line, then run it."""
    print("$", shlex.join(command), flush=True)
    return subprocess.run(command, **kwargs)


def _bench_0_6b():
    spec = importlib.util.spec_from_file_location("bench_0_6b", HERE / "bench_0_6b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_qwen3_06b(folder: Path) -> None:
    _bench_0_6b().make_model(folder)


def make_qwen3_5_08b(folder: Path) -> None:
    """A Qwen3.5-0.8B-shaped (text, hybrid) Hugging Face folder with seeded random weights."""
    _bench_0_6b().save_random_model(folder, "Qwen3_5TextConfig", "Qwen3_5ForCausalLM", QWEN3_5_08B)


MODELS = {"qwen3-0.6b": make_qwen3_06b, "qwen3_5-0.8b": make_qwen3_5_08b}


VARIANTS = {"int4-sym": ["--symmetric"], "int4-sym-head8": ["--symmetric", "--lm-head-bits", "8"]}


def _build(folder: Path, name: str, how: list[str]) -> Path:
    """An extra int4 build of the kept export (made when missing)."""
    build = folder / f"build-{name}"
    if not (build / "edgekit.json").is_file():
        run([EDGEKIT, "build", str(folder / "export-ort-fp32"), "--profile", "cpu-x86-64", "--quant", "int4", *how,
             "-o", str(build)], check=True)
    return build


def bench(name: str, work: Path, bin_dir: str, runs: int, threads: int) -> str:
    folder = work / name
    folder.mkdir(parents=True, exist_ok=True)
    MODELS[name](folder / "model")
    fp32, int4 = _bench_0_6b().make_builds(folder / "model", folder, keep_export=True)  # fp32 and int4 cpu-x86-64 builds
    extra = {name: _build(folder, name, how) for name, how in VARIANTS.items()}
    compare = ",".join([f"edgekit:int4={int4}", *(f"edgekit:{name}={path}" for name, path in extra.items()),
                        f"llamacpp:f32={bin_dir}", f"llamacpp:Q4_0={bin_dir}"])
    out = folder / "bench.json"
    command = [EDGEKIT, "bench", str(fp32), "--compare", compare, "--prompt-lengths", "1,512", "--new-tokens", "128",
               "--runs", str(runs), "--warmup", "1", "--threads", str(threads), "--output", str(out)]
    before = os.getloadavg()
    run(command, check=True, env={**os.environ, "EDGEKIT_CACHE": str(work / "cache")})
    after = os.getloadavg()
    from edgekit.bench.report import BenchReport, to_markdown

    data = json.loads(out.read_text())
    table = to_markdown(BenchReport(data["machine"], data["settings"], tuple(data["contenders"]), data["created"]))
    # after the runs the figure counts the bench's own threads: the one before says whether others shared the cores
    load = f"load average before {before[0]:.2f} / after {after[0]:.2f}" + (
        f" — LOADED (> {LOADED} before): not a measurement" if before[0] > LOADED else "")
    text = f"## {name}\n\n`{shlex.join(command)}`\n\n{load}\n\n{table}\n"
    (folder / "bench.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llamacpp", required=True, help="llama.cpp's bin folder (llama-server, llama-quantize)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgekit-vs-llamacpp"))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        if name not in MODELS:
            raise SystemExit(f"error: --models {name!r} is not one of {', '.join(MODELS)}")
        print(bench(name, args.work, args.llamacpp, args.runs, args.threads), flush=True)


if __name__ == "__main__":
    main()
