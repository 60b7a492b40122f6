"""Gemma 2: sandwich norms, (1 + w) RMSNorm, attention and final-logit softcapping.

Per layer (every norm is RMSNorm with weight 1 + w, folded into the weights before tracing)::

    h ── input_layernorm ── attention ── post_attention_layernorm ──(+h)── h'
    h' ── pre_feedforward_layernorm ── MLP ── post_feedforward_layernorm ──(+h')── next h

The two residual adds are fused into the next norm (``add_norm``), as in the Llama layout.
Attention scales by query_pre_attn_scalar**-0.5 (not head_dim) and softcaps the scores;
"sliding_attention" layers (``layer_types``) see ``sliding_window`` tokens, themselves
included; the logits are softcapped as cap * tanh(logits / cap).
The embeddings are scaled by sqrt(hidden_size) in the model dtype; Hugging Face's
embedding module does that and is kept as is.
"""

from __future__ import annotations

import torch

from edgekit.errors import ConfigError
from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Gemma2(DecoderArch):
    architectures = ("Gemma2ForCausalLM",)
    model_type = "gemma2"
    norm_class = "Gemma2RMSNorm"  # the (1 + w) norm folded by ``prepare``

    def __init__(self, config, config_path=None):
        super().__init__(config, config_path)
        if getattr(config, "use_bidirectional_attention", False):
            raise ConfigError(
                f"{config_path or 'the model config'} sets use_bidirectional_attention (an encoder, not a decoder)",
                "export the causal checkpoint; bidirectional Gemma embeddings are not supported",
            )

    @staticmethod
    def tiny_config():
        # head_dim 32 != 64 / 4 heads and query_pre_attn_scalar 24 != head_dim, as in the real
        # checkpoints; caps small enough that random weights reach the tanh's bend.
        return tiny_common(
            architectures=["Gemma2ForCausalLM"],
            model_type="gemma2",
            num_hidden_layers=4,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"] * 2,
            attn_logit_softcapping=5.0,
            final_logit_softcapping=2.0,
            hidden_activation="gelu_pytorch_tanh",
            tie_word_embeddings=True,
        )

    # -- hooks ---------------------------------------------------------------------------------

    def prepare(self, wrapper) -> None:
        # Gemma's RMSNorm computes norm(x) * (1 + w) in fp32; edgekit's op computes norm(x) * w'.
        for module in wrapper.decoder.modules():
            if type(module).__name__ == self.norm_class:
                wrapper.derive(module, "weight", _one_plus)

    def layer(self, wrapper, index, layer, hidden, residual, states, mask):
        """Sandwich block; returns (MLP branch, stream before it, states): the true stream is their sum."""
        if residual is None:
            residual, x = hidden, wrapper.norm(hidden, layer.input_layernorm.weight)
        else:
            x, residual = wrapper.add_norm(hidden, residual, layer.input_layernorm.weight)
        out, produced = self.mixer(wrapper, index, layer, x, states, mask)
        out = wrapper.norm(out, layer.post_attention_layernorm.weight)
        x, residual = wrapper.add_norm(out, residual, layer.pre_feedforward_layernorm.weight)
        out = wrapper.norm(layer.mlp(x), layer.post_feedforward_layernorm.weight)
        return out, residual, produced

    def attention_softcap(self) -> float:
        return float(self.config.attn_logit_softcapping or 0.0)

    def mixer(self, wrapper, index, layer, x, states, mask):
        return wrapper.attention(layer.self_attn, x, states[0], states[1], mask, index,
                                 rotary=self.rotary_table(index), scale=self.config.query_pre_attn_scalar**-0.5,
                                 softcap=self.attention_softcap())

    def logits(self, wrapper, hidden):
        logits = wrapper.lm_head(hidden).float()  # (B, S, vocab)
        cap = getattr(self.config, "final_logit_softcapping", None)
        return logits if not cap else cap * torch.tanh(logits / cap)


def _one_plus(w):
    return w.float().add(1.0).to(w.dtype)
