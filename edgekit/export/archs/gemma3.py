"""Gemma 3 text (gemma3_text): Gemma 2's layer with per-head q/k norm and a rope base per layer type.

Differences from Gemma 2 (``gemma2.py``): q and k get a per-head (1 + w) RMSNorm before rotary;
sliding ("local") and full ("global") layers rotate with their own rope parameters
(``rope_parameters[layer_type]``: base 10k locally, 1M and optional scaling globally), so the
wrapper holds two cos/sin tables; the attention scores are not softcapped (Hugging Face's
Gemma3Attention ignores ``attn_logit_softcapping``); the final logits are softcapped only when
``final_logit_softcapping`` is set (it is not in the released checkpoints).
"""

from __future__ import annotations

from torch import nn

from edgekit.export.archs import register
from edgekit.export.archs.base import tiny_common
from edgekit.export.archs.gemma2 import Gemma2

# Hugging Face layer type -> the wrapper's rotary table name.
TABLES = {"full_attention": "global", "sliding_attention": "local"}


class LayerTypeRotary(nn.Module):
    """Gemma3RotaryEmbedding bound to one layer type: forward(x, positions) -> (cos, sin)."""

    def __init__(self, rotary: nn.Module, layer_type: str):
        super().__init__()
        self.rotary, self.layer_type = rotary, layer_type

    def forward(self, x, position_ids):
        return self.rotary(x, position_ids, self.layer_type)


@register
class Gemma3(Gemma2):
    architectures = ("Gemma3ForCausalLM",)
    model_type = "gemma3_text"
    qk_norm = True
    norm_class = "Gemma3RMSNorm"

    @staticmethod
    def tiny_config():
        # Local layers on base 10k, global ones on base 1M with linear scaling (as the 4B-27B text
        # towers): distinct tables whatever the position. final_logit_softcapping stays unset,
        # as in the released checkpoints.
        return tiny_common(
            architectures=["Gemma3ForCausalLM"],
            model_type="gemma3_text",
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention"] * 3 + ["full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0},
            },
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )

    def rotary_modules(self, decoder):
        kinds = sorted(set(self.config.layer_types))
        return {TABLES[kind]: LayerTypeRotary(decoder.rotary_emb, kind) for kind in kinds}

    def rotary_table(self, index: int) -> str:
        return TABLES[self.config.layer_types[index]]

    def attention_softcap(self) -> float:
        return 0.0
