"""Run llama.cpp's own ``convert_hf_to_gguf.py``, unmodified, with one fallback for the tokenizer.

usage: python llamacpp_convert.py LLAMA_CPP_TREE <the usual convert_hf_to_gguf.py arguments>

A self-contained script (no edgekit import): it runs under the converter's interpreter, which
needs torch, transformers and the tree's ``gguf-py`` (the converter puts that on sys.path itself).

Why: the converter names a byte-level BPE's pre-tokenizer by hashing how the tokenizer splits a
fixed text, and only knows the hashes of published models. For any other tokenizer (edgekit's
presets' among them) it stops with
    NotImplementedError: BPE pre-tokenizer was not recognized - update get_vocab_base_pre()
When, and only when, that happens, :func:`pre_tokenizer_name` names the llama.cpp pre-tokenizer
whose split regex is the one tokenizer.json declares; the vocab, merges, weights and
hyper-parameters stay the converter's own.
"""

from __future__ import annotations

import json
import logging
import runpy
import sys
from pathlib import Path

log = logging.getLogger("llamacpp_convert")

# The regexes of llama.cpp's pre-tokenizers (src/llama-vocab.cpp) as Hugging Face tokenizers spell them.
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}


def pre_tokenizer_name(tokenizer_json: dict) -> str:
    """The llama.cpp pre-tokenizer (``tokenizer.ggml.pre``) that splits text as this tokenizer does.

    ``ByteLevel`` with its built-in regex is GPT-2's split (llama.cpp "gpt-2"); a ``Split`` on a
    known regex followed by a regex-free ``ByteLevel`` is that model's ("qwen2", "llama-bpe").
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if tokenizer_json.get("normalizer"):
        raise NotImplementedError(f"a tokenizer with a normalizer ({tokenizer_json['normalizer'].get('type')}) "
                                  "has no llama.cpp pre-tokenizer known to edgekit")
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else None
    if steps and len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel" \
            and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise NotImplementedError(f"no llama.cpp pre-tokenizer matches this tokenizer.json pre_tokenizer: "
                              f"{json.dumps(pre)[:200]}")


def patch(text_model) -> None:
    """Make ``TextModel.get_vocab_base_pre`` fall back to :func:`pre_tokenizer_name`."""
    original = text_model.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            tokenizer_json = json.loads((Path(self.dir_model) / "tokenizer.json").read_text(encoding="utf-8"))
            name = pre_tokenizer_name(tokenizer_json)
            log.warning("pre-tokenizer hash not in the converter's table; tokenizer.json splits as %r", name)
            return name

    text_model.get_vocab_base_pre = get_vocab_base_pre


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    tree = Path(sys.argv[1]).resolve()
    sys.argv = [str(tree / "convert_hf_to_gguf.py"), *sys.argv[2:]]
    sys.path.insert(0, str(tree))  # `conversion` is the converter's package, beside it
    sys.path.insert(1, str(tree / "gguf-py"))
    from conversion.base import TextModel

    patch(TextModel)
    runpy.run_path(str(tree / "convert_hf_to_gguf.py"), run_name="__main__")


if __name__ == "__main__":
    main()
