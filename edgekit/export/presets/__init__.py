"""Built-in presets: a family's tiny config, the shipped tokenizer and seeded random weights.

A preset is materialized once into the cache (``$EDGEKIT_CACHE`` or ``~/.cache/edgekit``)
as an ordinary Hugging Face folder, so export and validate read the very same weights.
Trained presets (TRAINED) ship as such a folder inside the package and are used in place.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from edgekit._files import cache_dir  # where presets are materialized

TOKENIZER_DIR = Path(__file__).parent / "tokenizer"
DEFAULT_PRESET = "tiny-code"  # trained on Python source: the demo prints code-like text

# preset name -> (Hugging Face architecture, seed)
PRESETS: dict[str, tuple[str, int]] = {
    "tiny-llama": ("LlamaForCausalLM", 0),
    "tiny-qwen3": ("Qwen3ForCausalLM", 0),
    "tiny-qwen2": ("Qwen2ForCausalLM", 0),
    "tiny-mistral": ("MistralForCausalLM", 0),
    "tiny-qwen3.5": ("Qwen3_5ForCausalLM", 0),
    "tiny-qwen3-next": ("Qwen3NextForCausalLM", 0),
    "tiny-gemma3": ("Gemma3ForCausalLM", 0),
    "tiny-code": ("Qwen3ForCausalLM", 0),
    "tiny-code-mtp": ("Qwen3_5ForCausalLM", 0),
}
# Presets with trained weights shipped as package data (scripts/train_tiny_code.py), with a
# held-out text (heldout.txt) for quality measurement: random weights make perplexity meaningless.
TRAINED: dict[str, Path] = {
    "tiny-code": Path(__file__).parent / "tiny-code",
    # Qwen3.5 with an MTP head (mtp.* tensors), same corpus (scripts/train_tiny_code_mtp.py): speculative decoding.
    "tiny-code-mtp": Path(__file__).parent / "tiny-code-mtp",
}




def preset_config(name: str) -> dict:
    """The Hugging Face config dict of a preset."""
    from edgekit.export.archs import families

    if name in TRAINED:
        return json.loads((TRAINED[name] / "config.json").read_text())
    architecture, _ = PRESETS[name]
    return families()[architecture].tiny_config()


def materialize(name: str) -> Path:
    """Write the preset's Hugging Face folder (config, seeded weights, tokenizer) if missing."""
    if name in TRAINED:
        return TRAINED[name]
    import torch
    import transformers

    from edgekit._files import atomic_dir

    architecture, seed = PRESETS[name]
    values = preset_config(name)
    # The folder name pins everything the weights depend on, so a changed preset is rebuilt.
    digest = hashlib.sha256(json.dumps([values, seed], sort_keys=True).encode()).hexdigest()[:10]
    folder = cache_dir() / "presets" / f"{name}-{digest}-transformers{transformers.__version__}"
    if (folder / "config.json").is_file():
        return folder
    config = transformers.AutoConfig.for_model(**values)
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config).eval()
    with atomic_dir(folder, force=True) as tmp:
        model.save_pretrained(tmp)
        for item in TOKENIZER_DIR.iterdir():
            shutil.copy(item, tmp / item.name)
    return folder
