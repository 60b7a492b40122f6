"""Train the ``tiny-code-mtp`` preset: a small Qwen3.5 (Gated DeltaNet + full attention) with an MTP head.

    python scripts/train_tiny_code_mtp.py [--out edgekit/export/presets/tiny-code-mtp] [--steps 240]
                                          [--distill-steps 150] [--distill-only]

The same corpus, held-out text and seeding as tiny-code (scripts/train_tiny_code.py). The loss is the
next-token loss plus the MTP head's: from the final hidden state at t and the embedding of token t+1,
predict token t+2 (DeepSeek-V3 / Qwen3.5 style), so speculative decoding's acceptance means something.
The head's tensors are saved as ``mtp.*`` in model.safetensors, as Qwen3.5 checkpoints ship them.
Stage 2 (``distill``) then trains the head alone on the frozen model's own predictions.
240 + 150 steps: about 25 minutes wall on this round's shared 2-core machine (load 10), ~6 CPU-minutes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("train_tiny_code", ROOT / "scripts" / "train_tiny_code.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)

CONFIG = {
    "architectures": ["Qwen3_5ForCausalLM"], "model_type": "qwen3_5_text",
    "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,  # linear, linear, linear, full
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32,
    "linear_conv_kernel_dim": 4, "linear_key_head_dim": 32, "linear_value_head_dim": 32,
    "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    "vocab_size": 2048, "max_position_embeddings": 1024, "rms_norm_eps": 1e-6,
    "initializer_range": 0.02, "tie_word_embeddings": True, "mtp_num_hidden_layers": 1,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                        "mrope_section": [4, 2, 2]},
    "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0,
}
MTP_WEIGHT = 1.0  # the head's loss counts as much as the model's: acceptance is what it is for
DISTILL_LR = 2e-3


def train(steps: int):
    from edgekit.export.mtp import MtpHead

    torch.manual_seed(base.SEED)
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(base.TOKENIZER_DIR / "tokenizer.json"))
    train_files, _ = base.source_files()
    data = torch.from_numpy(base.token_stream(tokenizer, train_files))
    config = transformers.AutoConfig.for_model(**CONFIG)
    config._attn_implementation = "sdpa"
    model = transformers.Qwen3_5ForCausalLM(config)
    head = MtpHead(config)
    params = [*model.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=base.LR, weight_decay=0.1, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng = torch.Generator().manual_seed(base.SEED)
    model.train(), head.train()
    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - base.SEQ - 1, (base.BATCH,), generator=rng)
        batch = torch.stack([data[s:s + base.SEQ + 1] for s in starts.tolist()])  # (B, SEQ + 1)
        hidden = model.model(input_ids=batch).last_hidden_state  # (B, S, H), after the final norm
        logits = model.lm_head(hidden)
        main = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch[:, 1:].flatten())
        mtp = mtp_loss(model, head, batch, hidden)
        loss = main + MTP_WEIGHT * mtp
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {main.item():.3f}  mtp {mtp.item():.3f}  {time.time() - start:.0f}s", flush=True)
    info = {"steps": steps, "final_loss": round(main.item(), 4), "final_mtp_loss": round(mtp.item(), 4),
            "mtp_weight": MTP_WEIGHT, "train_tokens": int(len(data)), "train_files": [p.name for p in train_files],
            "heldout_files": list(base.HELDOUT), "seed": base.SEED, "seq": base.SEQ, "batch": base.BATCH,
            "lr": base.LR, "torch": torch.__version__}
    return model.eval(), head.eval(), info


def mtp_loss(model, head, batch, hidden):
    """Cross-entropy of x_{t+2} from (h_t, x_{t+1}) at every t with a t+2 in the window."""
    s = batch.shape[1] - 2
    embeds = model.model.embed_tokens(batch[:, 1:s + 1])  # (B, s, H): x_{t+1}
    positions = torch.arange(s).view(1, 1, -1).expand(3, batch.shape[0], -1)  # text mRoPE: 3 equal sections
    rotary = model.model.rotary_emb(embeds, positions)
    out = head(embeds, hidden[:, :s], rotary)  # (B, s, H)
    return F.cross_entropy(model.lm_head(out).flatten(0, 1), batch[:, 2:].flatten())


def write(model, head, info: dict, out: Path) -> None:
    base.write(model, info, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.update({f"mtp.{k}": v.to(torch.float16).contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # save_file creates it private; package data must be readable by all
    config = json.loads((out / "config.json").read_text())
    config["mtp_num_hidden_layers"] = 1
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def distill(out: Path, steps: int) -> None:
    """Stage 2: the saved (fp16) model frozen, the head trained on its own next-token distribution.

    Acceptance is agreement with the target, not with the corpus: the head learns what the model at
    t + 1 would predict for t + 2 (soft targets). Starts from the folder stage 1 wrote, so a rerun of
    both stages gives the same weights.
    """
    from edgekit.export.mtp import load_head

    torch.manual_seed(base.SEED + 1)
    torch.set_num_threads(1)
    tokenizer = Tokenizer.from_file(str(base.TOKENIZER_DIR / "tokenizer.json"))
    data = torch.from_numpy(base.token_stream(tokenizer, base.source_files()[0]))
    model = transformers.Qwen3_5ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    head = load_head(out, model.config).train()
    optimizer = torch.optim.AdamW(head.parameters(), lr=DISTILL_LR, weight_decay=0.0)
    rng = torch.Generator().manual_seed(base.SEED + 1)
    start = time.time()
    for step in range(steps):
        starts = torch.randint(0, len(data) - base.SEQ - 1, (base.BATCH,), generator=rng)
        batch = torch.stack([data[s:s + base.SEQ + 1] for s in starts.tolist()])  # (B, SEQ + 1)
        with torch.no_grad():
            hidden = model.model(input_ids=batch).last_hidden_state  # (B, S, H)
            teacher = torch.softmax(model.lm_head(hidden[:, 1:-1]), dim=-1)  # the model's view of t + 2, (B, S - 2, V)
        s = batch.shape[1] - 2
        embeds = model.model.embed_tokens(batch[:, 1:s + 1])
        positions = torch.arange(s).view(1, 1, -1).expand(3, batch.shape[0], -1)
        out_hidden = head(embeds, hidden[:, :s], model.model.rotary_emb(embeds, positions))
        loss = -(teacher * torch.log_softmax(model.lm_head(out_hidden), dim=-1)).sum(-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == steps - 1:
            print(f"distill {step:4d}  loss {loss.item():.3f}  {time.time() - start:.0f}s", flush=True)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    tensors.update({f"mtp.{k}": v.detach().to(torch.float16).contiguous() for k, v in head.state_dict().items()})
    save_file(tensors, str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)
    info = json.loads((out / "training.json").read_text())
    info.update(distill_steps=steps, distill_lr=DISTILL_LR, final_distill_loss=round(loss.item(), 4))
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "edgekit" / "export" / "presets" / "tiny-code-mtp")
    parser.add_argument("--steps", type=int, default=240)
    parser.add_argument("--distill-steps", type=int, default=150)
    parser.add_argument("--distill-only", action="store_true", help="stage 2 alone, on the folder stage 1 wrote")
    args = parser.parse_args()
    if not args.distill_only:
        model, head, info = train(args.steps)
        write(model, head, info, args.out)
        print(f"wrote {args.out} (final loss {info['final_loss']}, MTP loss {info['final_mtp_loss']})")
    distill(args.out, args.distill_steps)
    print(f"distilled the MTP head of {args.out} ({args.distill_steps} steps)")


if __name__ == "__main__":
    main()
