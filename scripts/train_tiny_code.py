"""Train the ``tiny-code`` preset: a small Qwen3 on Python standard-library source, reproducibly.

    python scripts/train_tiny_code.py [--out edgekit/export/presets/tiny-code] [--steps 300]

The data is this interpreter's standard library: top-level ``*.py`` files in sorted order, minus
HELDOUT, tokenized with the preset tokenizer. Windows are drawn with a fixed seed on one thread
(torch.set_num_threads(1)), so a rerun on the same torch gives the same weights. The held-out
files are written to ``heldout.txt`` for quality measurement (edgekit validate --quality), and
8 KB of training files to ``calibration.txt`` for GPTQ (edgekit build --calibration).
300 steps of 16 x 128 tokens: about 2 CPU-minutes (3 minutes wall on a shared machine); final loss 4.88.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = ROOT / "edgekit" / "export" / "presets" / "tokenizer"
# Never trained on: their text is heldout.txt.
HELDOUT = ("textwrap.py", "colorsys.py", "bisect.py")
HELDOUT_CHARS = 6000
CALIBRATION_CHARS = 8000  # GPTQ calibration text: from the training files, so never the held-out ones
CONFIG = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "vocab_size": 2048, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "initializer_range": 0.02, "tie_word_embeddings": True,
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}
SEED, SEQ, BATCH, LR, MAX_TRAIN_FILES = 0, 128, 16, 6e-3, 60


def source_files() -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) from the stdlib, in a fixed sorted order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.glob("*.py") if p.is_file())
    held = [stdlib / name for name in HELDOUT]
    train = [p for p in files if p.name not in HELDOUT and not p.name.startswith("_")][:MAX_TRAIN_FILES]
    return train, held


def token_stream(tokenizer: Tokenizer, files: list[Path]) -> np.ndarray:
    ids: list[int] = []
    for path in files:
        ids.extend(tokenizer.encode(path.read_text(encoding="utf-8", errors="replace")).ids)
        ids.append(0)  # <|endoftext|> between files
    return np.asarray(ids, dtype=np.int64)


def train(steps: int) -> tuple[transformers.PreTrainedModel, dict]:
    torch.manual_seed(SEED)
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 threads spin-wait: 4x the CPU per step
    tokenizer = Tokenizer.from_file(str(TOKENIZER_DIR / "tokenizer.json"))
    train_files, _ = source_files()
    data = torch.from_numpy(token_stream(tokenizer, train_files))
    model = transformers.Qwen3ForCausalLM(transformers.AutoConfig.for_model(**CONFIG))
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng = torch.Generator().manual_seed(SEED)
    model.train()
    start, loss = time.time(), None
    for step in range(steps):
        starts = torch.randint(0, len(data) - SEQ - 1, (BATCH,), generator=rng)
        batch = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])  # (BATCH, SEQ + 1)
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels by one itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    info = {"steps": steps, "final_loss": round(loss.item(), 4), "train_tokens": int(len(data)),
            "train_files": [p.name for p in train_files], "heldout_files": list(HELDOUT),
            "seed": SEED, "seq": SEQ, "batch": BATCH, "lr": LR, "torch": torch.__version__}
    return model.eval(), info


def write(model, info: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out, safe_serialization=True)
    for item in TOKENIZER_DIR.iterdir():
        shutil.copy(item, out / item.name)
    # A code model, not a chat model: without a chat template `edgekit run --chat` refuses it clearly.
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    _, held = source_files()
    text = "".join(p.read_text(encoding="utf-8") for p in held)[:HELDOUT_CHARS]
    (out / "heldout.txt").write_text(text, encoding="utf-8")
    write_calibration(out)
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def write_calibration(out: Path) -> None:
    train, _ = source_files()
    text = "".join(p.read_text(encoding="utf-8", errors="replace") for p in train[-3:])[:CALIBRATION_CHARS]
    (out / "calibration.txt").write_text(text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "edgekit" / "export" / "presets" / "tiny-code")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    model, info = train(args.steps)
    write(model, info, args.out)
    print(f"wrote {args.out} (final loss {info['final_loss']})")


if __name__ == "__main__":
    main()
