"""Llama 2/3 (incl. Llama 3 rope scaling, which the rotary tables carry exactly)."""

from __future__ import annotations

from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Llama(DecoderArch):
    architectures = ("LlamaForCausalLM",)
    model_type = "llama"

    @staticmethod
    def tiny_config():
        return tiny_common(
            architectures=["LlamaForCausalLM"],
            model_type="llama",
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
            },
        )
