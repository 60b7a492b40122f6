"""Export a model bigger than memory: Qwen3.6-27B's text shape with seeded random bf16 weights.

    python benchmarks/big_export.py [--work /tmp/edgekit-big] [--quant int4] [--delete-checkpoint]
    python benchmarks/big_export.py --work /tmp/big10 --layers 4 --hidden 256 --intermediate 512 \
        --vocab 4096 --quant none --results /tmp/big10/big_export.json          # smoke test

Steps, each a subprocess under ``/usr/bin/time -v`` (peak RSS, wall time):
1. checkpoint: write the Hugging Face folder shard by shard, tensor by tensor, in chunks, so memory
   stays at a few chunks whatever the model size (this script, ``--only-checkpoint``);
2. export:     ``edgekit export CKPT -o OUT --target ort --quant int4 --force``;
3. run:        ``edgekit run OUT --prompt-ids 1,...,8 --max-new-tokens 8 --json --threads 2``.
Free disk is checked first (the full size needs about 72 GB). Results go to
benchmarks/results/big_export.json and a markdown table for benchmarks/README.md is printed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GB = 10**9
MAX_SHARD_BYTES = 5 * GB  # save_pretrained's "5GB" is decimal
CHUNK = 1 << 24  # elements generated at once: 64 MB of float32
# export bytes per bf16 checkpoint byte: int4 = 4-bit weights + scales (about 1/3.3), none = fp32 (2x)
EXPORT_RATIO = {"none": 2.0}  # fp32 export of a bf16 checkpoint


def export_ratio(quant: str, block: int) -> float:
    """Export bytes per checkpoint (bf16) byte: n-bit weights + an fp32 scale and an n-bit zero point per block."""
    bits = {"int4": 4, "int8": 8}.get(quant)
    return EXPORT_RATIO.get(quant, 1.0) if bits is None else (bits + (32 + bits) / block) / 16
MARGIN = 2 * GB
FORMAT = 1  # bump when the weights this script writes change, so old checkpoints are rewritten
RESULTS = Path(__file__).parent / "results" / "big_export.json"

# Qwen3.6-27B's text configuration (its config.json's text_config); the MTP head is not part of
# Qwen3_5ForCausalLM and is left out.
QWEN36_27B = {
    "vocab_size": 248320, "hidden_size": 5120, "intermediate_size": 17408, "num_hidden_layers": 64,
    "num_attention_heads": 24, "num_key_value_heads": 4, "head_dim": 256,
    "linear_num_key_heads": 16, "linear_num_value_heads": 48,
    "linear_key_head_dim": 128, "linear_value_head_dim": 128, "linear_conv_kernel_dim": 4,
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "attn_output_gate": True, "tie_word_embeddings": False, "initializer_range": 0.02,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10_000_000, "partial_rotary_factor": 0.25,
                        "mrope_interleaved": True, "mrope_section": [11, 11, 10]},
    # the preset tokenizer's <|endoftext|> (the real vocabulary is not shipped)
    "eos_token_id": 0, "pad_token_id": 0,
}


# ----------------------------------------------------------------------------- the configuration
def text_config(layers=None, hidden=None, intermediate=None, vocab=None):
    """Qwen3.6-27B's Qwen3_5TextConfig; overrides shrink it for smoke tests (head dims scale with hidden)."""
    import transformers

    values = json.loads(json.dumps(QWEN36_27B))
    if hidden is not None:
        scale = hidden / QWEN36_27B["hidden_size"]
        # ORT's GQA wants head_dim % 16 == 0 and a rotary half (head_dim / 8 here) that is a multiple of 8
        values["head_dim"] = max(64, round(256 * scale / 64) * 64)
        values["linear_key_head_dim"] = values["linear_value_head_dim"] = max(16, round(128 * scale / 16) * 16)
        half = int(values["head_dim"] * values["rope_parameters"]["partial_rotary_factor"]) // 2
        values["rope_parameters"]["mrope_section"] = _mrope_section(half)
    for key, value in (("num_hidden_layers", layers), ("hidden_size", hidden),
                       ("intermediate_size", intermediate), ("vocab_size", vocab)):
        if value is not None:
            values[key] = value
    return transformers.Qwen3_5TextConfig(architectures=["Qwen3_5ForCausalLM"], dtype="bfloat16", **values)


def _mrope_section(half: int) -> list[int]:
    """Split a rotary half-dimension over (t, h, w) as Qwen does: 32 -> [11, 11, 10]."""
    base, extra = divmod(half, 3)
    return [base + (i < extra) for i in range(3)]


# ----------------------------------------------------------------------------- the tensors
@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor: its name, shape and how HF's _init_weights fills it."""

    name: str
    shape: tuple[int, ...]
    init: str  # normal | zeros | ones | a_log

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape, dtype=np.int64))


def tensor_specs(config) -> list[TensorSpec]:
    """Names, shapes and init rules of Qwen3_5ForCausalLM's state dict, from a meta-device model."""
    import torch
    import transformers

    with torch.device("meta"):
        model = transformers.Qwen3_5ForCausalLM(config)
    inits = {}
    for prefix, module in model.named_modules():
        kind = type(module).__name__
        if kind == "Qwen3_5RMSNorm":  # applied as norm(x) * (1 + w): zero is the identity
            inits[f"{prefix}.weight"] = "zeros"
        elif kind == "Qwen3_5RMSNormGated":  # the gated norm in Gated DeltaNet is a plain w
            inits[f"{prefix}.weight"] = "ones"
        elif kind == "Qwen3_5GatedDeltaNet":
            inits[f"{prefix}.dt_bias"], inits[f"{prefix}.A_log"] = "ones", "a_log"
    return [TensorSpec(name, tuple(t.shape), inits.get(name, "normal")) for name, t in model.state_dict().items()]


def plan_shards(specs: list[TensorSpec], max_bytes: int) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most max_bytes (a bigger tensor gets its own), as the hub does."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; x is clobbered."""
    bits = x.view(np.uint32)
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype("<u2")


def tensor_chunks(spec: TensorSpec, seed: int, std: float):
    """Yield the tensor's bf16 bits in chunks; the generator is seeded by (seed, name), so order does not matter."""
    count = int(np.prod(spec.shape, dtype=np.int64))
    if spec.init in ("zeros", "ones"):
        yield bf16_bits(np.full(count, 0.0 if spec.init == "zeros" else 1.0, np.float32))
        return
    name_key = int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:8], "little")
    rng = np.random.default_rng([seed, name_key])
    if spec.init == "a_log":  # HF: A = uniform(0.01, 16); A_log = log(A)
        yield bf16_bits(np.log(rng.uniform(0.01, 16, count)).astype(np.float32))
        return
    for start in range(0, count, CHUNK):
        chunk = rng.standard_normal(min(CHUNK, count - start), dtype=np.float32)
        chunk *= np.float32(std)
        yield bf16_bits(chunk)


def write_safetensors(path: Path, specs: list[TensorSpec], seed: int, std: float) -> None:
    """Write one safetensors file tensor by tensor: u64 header length, JSON header, raw little-endian data."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in specs:
        header[spec.name] = {"dtype": "BF16", "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for spec in specs:
            for bits in tensor_chunks(spec, seed, std):
                f.write(bits.tobytes())
    tmp.rename(path)


# ----------------------------------------------------------------------------- the checkpoint
def _stamp(config, seed: int, max_shard_bytes: int) -> dict:
    return {"format": FORMAT, "seed": seed, "max_shard_bytes": max_shard_bytes, "config": config.to_dict()}


def checkpoint_complete(folder: Path, config, seed: int, max_shard_bytes: int) -> bool:
    """True if folder holds a finished checkpoint written from the same config, seed and shard size."""
    marker = folder / "big_export_stamp.json"
    expected = json.loads(json.dumps(_stamp(config, seed, max_shard_bytes)))  # tuples -> lists, as on disk
    return marker.is_file() and json.loads(marker.read_text()) == expected


def write_checkpoint(folder: Path, config, seed: int = 0, max_shard_bytes: int = MAX_SHARD_BYTES) -> int:
    """Write a save_pretrained-style sharded bf16 checkpoint + tokenizer without holding it in memory; return bytes."""
    import transformers

    from edgekit.export.presets import TOKENIZER_DIR

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    specs = tensor_specs(config)
    shards = plan_shards(specs, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        print(f"  {name}: {len(shard)} tensors, {sum(s.nbytes for s in shard) / GB:.2f} GB", flush=True)
        write_safetensors(folder / name, shard, seed, config.initializer_range)
        weight_map.update({spec.name: name for spec in shard})
    total = sum(spec.nbytes for spec in specs)
    if len(shards) > 1:
        index = {"metadata": {"total_parameters": total // 2, "total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    config.save_pretrained(folder)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(folder)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, folder / item.name)
    (folder / "big_export_stamp.json").write_text(json.dumps(_stamp(config, seed, max_shard_bytes)))
    return total


# ----------------------------------------------------------------------------- measuring
def check_free_disk(folder: Path, required: int, free: int | None = None) -> int:
    """Exit with a one-line error unless `required` bytes fit on folder's file system; return the free bytes."""
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free if free is None else free
    print(f"disk: need about {required / GB:.1f} GB under {folder}, {free / GB:.1f} GB free")
    if required > free:
        # export reads the checkpoint while writing its output, so both must fit at once
        raise SystemExit(f"error: not enough free disk under {folder}: need about {required / GB:.1f} GB, "
                         f"{free / GB:.1f} GB free\nhint: free space, or pass --work on a file system with more room")
    return free


def parse_time_v(text: str) -> dict:
    """Peak RSS (bytes), wall seconds and exit status from GNU time's -v report."""
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if not (rss and wall and status):
        raise ValueError(f"not a /usr/bin/time -v report: {text[:200]!r}")
    seconds = 0.0
    for part in wall.group(1).split(":"):  # h:mm:ss or m:ss.ss
        seconds = seconds * 60 + float(part)
    return {"peak_rss_bytes": int(rss.group(1)) * 1024, "wall_s": seconds, "exit_status": int(status.group(1))}


def timed(step: str, cmd: list[str], work: Path, capture: bool = False) -> tuple[dict, str]:
    """Run cmd under /usr/bin/time -v; return its measurements and (if capture) its stdout."""
    print(f"\n[{step}] {' '.join(cmd)}", flush=True)
    report = work / f"time-{step}.txt"
    done = subprocess.run(["/usr/bin/time", "-v", "-o", str(report), *cmd],
                          stdout=subprocess.PIPE if capture else None, text=True)
    measured = parse_time_v(report.read_text())
    if measured["exit_status"] != 0:
        print(f"[{step}] failed with exit status {measured['exit_status']} (its output is above)")
    return {"step": step, "command": " ".join(cmd), **measured}, done.stdout or ""


def folder_bytes(folder: Path) -> int:
    """Bytes of all files under folder."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def markdown_table(steps: list[dict]) -> str:
    """The table for benchmarks/README.md."""
    lines = ["| step | wall s | peak RSS GB | bytes GB | exit |", "|---|---|---|---|---|"]
    for s in steps:
        size = f"{s['bytes'] / GB:.2f}" if s.get("bytes") is not None else ""
        rss = f"{s['peak_rss_bytes'] / GB:.2f}" if s.get("peak_rss_bytes") is not None else ""
        wall = f"{s['wall_s']:.1f}" if s.get("wall_s") is not None else ""
        lines.append(f"| {s['step']} | {wall} | {rss} | {size} | {s.get('exit_status', '')} |")
    return "\n".join(lines)


def run_line(run: dict) -> str:
    """What `edgekit run` produced, as one line under the table."""
    if not run.get("token_ids"):
        return f"run: {run.get('error', 'not run')}"
    return (f"run: decode {run['decode_tokens_per_s']:.2f} tok/s, first token {run['ttft_ms']:.0f} ms, "
            f"tokens {run['token_ids']} (stopped by {run['stopped_by']})")


# ----------------------------------------------------------------------------- orchestration
def edgekit_exe() -> str:
    """The edgekit next to this Python (the venv's), else the one on PATH."""
    local = Path(sys.executable).parent / "edgekit"
    return str(local) if local.exists() else (shutil.which("edgekit") or "edgekit")


def export_has_quant(edgekit: str) -> bool:
    """Whether this edgekit's export takes --quant (issue #10's streaming export)."""
    done = subprocess.run([edgekit, "export", "--help"], capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})
    return "--quant" in done.stdout


def _size_args(args) -> list[str]:
    pairs = (("--layers", args.layers), ("--hidden", args.hidden), ("--intermediate", args.intermediate),
             ("--vocab", args.vocab), ("--seed", args.seed), ("--max-shard-gb", args.max_shard_gb))
    return [str(x) for flag, value in pairs if value is not None for x in (flag, value)]


def step_checkpoint(args, config, ckpt: Path, max_shard: int) -> dict:
    """Write the checkpoint in a child process (so its peak RSS is its own), or reuse a complete one."""
    if checkpoint_complete(ckpt, config, args.seed, max_shard):
        print(f"\n[checkpoint] {ckpt} is complete and matches; reusing it")
        return {"step": "checkpoint (reused)", "bytes": folder_bytes(ckpt)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--only-checkpoint", "--work", str(args.work)]
    cmd += _size_args(args)
    step, _ = timed("checkpoint", cmd, args.work)
    return {**step, "bytes": folder_bytes(ckpt)}


def step_export(args, ckpt: Path, out: Path) -> dict:
    cmd = [edgekit_exe(), "export", str(ckpt), "-o", str(out), "--target", "ort", "--force"]
    cmd += [] if args.quant == "none" else ["--quant", args.quant, "--block-size", str(args.block_size)]
    step, _ = timed("export", cmd, args.work)
    return {**step, "bytes": folder_bytes(out) if out.exists() else None}


def step_run(args, out: Path) -> tuple[dict, dict]:
    cmd = [edgekit_exe(), "run", str(out), "--prompt-ids", "1,2,3,4,5,6,7,8", "--max-new-tokens", "8",
           "--json", "--threads", str(args.threads)]
    step, stdout = timed("run", cmd, args.work, capture=True)
    try:
        data = json.loads(stdout)
    except json.JSONDecodeError:
        return step, {"error": f"no JSON on stdout (exit status {step['exit_status']}): {stdout[-300:]!r}"}
    keys = ("token_ids", "decode_tokens_per_s", "ttft_ms", "stopped_by", "provider")
    return step, {k: data.get(k) for k in keys}


def disk_needed(args, config, ckpt: Path, max_shard: int) -> int:
    """Bytes still to be written: the checkpoint unless present, the export unless skipped, plus a margin."""
    ckpt_bytes = sum(spec.nbytes for spec in tensor_specs(config))
    have_ckpt = args.skip_checkpoint or checkpoint_complete(ckpt, config, args.seed, max_shard)
    export_bytes = int(ckpt_bytes * export_ratio(args.quant, args.block_size))
    print(f"model: {ckpt_bytes // 2 / 1e9:.2f} B parameters, bf16 checkpoint {ckpt_bytes / GB:.1f} GB"
          f"{' (present)' if have_ckpt else ''}, export (--quant {args.quant}) about {export_bytes / GB:.1f} GB")
    needed = 0 if have_ckpt else ckpt_bytes
    needed += 0 if args.skip_export else export_bytes
    return needed + MARGIN


def machine() -> dict:
    """What the numbers were measured on."""
    import onnxruntime
    import transformers

    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {"cores": os.cpu_count(), "ram_gb": round(ram / GB, 1), "cpu": platform.processor() or platform.machine(),
            "onnxruntime": onnxruntime.__version__, "transformers": transformers.__version__}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/edgekit-big"), help="checkpoint, export and logs")
    parser.add_argument("--quant", default="int4", help="passed to edgekit export --quant; 'none' omits the flag")
    parser.add_argument("--block-size", type=int, default=128,
                        help="int4/int8 weights per scale (128, as GPTQ/AWQ groups: 4.25 bits per weight)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-shard-gb", type=float, default=None, help="shard size cap (default 5)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--delete-checkpoint", action="store_true",
                        help="remove the checkpoint after a successful export (frees disk before the run)")
    parser.add_argument("--skip-checkpoint", action="store_true", help="use the checkpoint already in --work")
    parser.add_argument("--skip-export", action="store_true", help="use the export already in --work")
    parser.add_argument("--only-checkpoint", action="store_true", help=argparse.SUPPRESS)
    for flag in ("--layers", "--hidden", "--intermediate", "--vocab"):
        parser.add_argument(flag, type=int, default=None, help="smoke-test override of the 27B shape")
    return parser.parse_args(argv)


def run_steps(args, config, ckpt: Path, out: Path, max_shard: int) -> tuple[list[dict], dict]:
    """checkpoint -> export -> run, stopping at the first failure; returns the steps and run's output."""
    steps = []
    if not args.skip_checkpoint:
        steps.append(step_checkpoint(args, config, ckpt, max_shard))
    if not args.skip_export:
        steps.append(step_export(args, ckpt, out))
    if any(s.get("exit_status", 0) != 0 for s in steps):
        return steps, {}
    if args.delete_checkpoint and ckpt.exists():
        shutil.rmtree(ckpt)
        print(f"deleted {ckpt}")
    step, run = step_run(args, out)
    return [*steps, step], run


def write_report(args, config, steps: list[dict], run: dict) -> None:
    """Save the results as JSON and print the table for benchmarks/README.md."""
    report = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
              "quant": args.quant, "config": {k: v for k, v in config.to_dict().items() if k != "layer_types"},
              "steps": steps, "run": run}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\n{markdown_table(steps)}\n\n{run_line(run)}\nresults: {args.results}")


def main(argv=None) -> int:
    args = parse_args(argv)
    config = text_config(args.layers, args.hidden, args.intermediate, args.vocab)
    max_shard = int((args.max_shard_gb or MAX_SHARD_BYTES / GB) * GB)
    ckpt, out = args.work / "checkpoint", args.work / f"export-{args.quant}"
    if args.only_checkpoint:
        write_checkpoint(ckpt, config, args.seed, max_shard)
        return 0
    edgekit = edgekit_exe()
    if not args.skip_export and args.quant != "none" and not export_has_quant(edgekit):
        raise SystemExit(f"error: {edgekit} export has no --quant yet (issue #10's streaming export)\n"
                         "hint: rerun with --quant none to export without quantizing")
    check_free_disk(args.work, disk_needed(args, config, ckpt, max_shard))
    args.work.mkdir(parents=True, exist_ok=True)
    steps, run = run_steps(args, config, ckpt, out, max_shard)
    write_report(args, config, steps, run)
    return 0 if all(s.get("exit_status", 0) == 0 for s in steps) and run.get("token_ids") else 1


if __name__ == "__main__":
    sys.exit(main())
