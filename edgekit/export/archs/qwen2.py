"""Qwen2 / Qwen2.5: q/k/v projections carry a bias."""

from __future__ import annotations

from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Qwen2(DecoderArch):
    architectures = ("Qwen2ForCausalLM",)
    model_type = "qwen2"

    @staticmethod
    def tiny_config():
        return tiny_common(architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True)
