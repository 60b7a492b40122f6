"""Mistral: every layer attends within a sliding window."""

from __future__ import annotations

from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Mistral(DecoderArch):
    architectures = ("MistralForCausalLM",)
    model_type = "mistral"

    @staticmethod
    def tiny_config():
        return tiny_common(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16, tie_word_embeddings=False)
