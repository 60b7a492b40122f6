"""Qwen3 (dense): per-head RMSNorm on q and k; head_dim set apart from hidden/heads."""

from __future__ import annotations

from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Qwen3(DecoderArch):
    architectures = ("Qwen3ForCausalLM",)
    model_type = "qwen3"
    qk_norm = True

    @staticmethod
    def tiny_config():
        # head_dim 32 != hidden 64 / 4 heads: the case optimum gets wrong.
        return tiny_common(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=32, tie_word_embeddings=True)
