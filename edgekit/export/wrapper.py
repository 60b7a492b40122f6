"""The module that is traced: a Hugging Face decoder rewired around edgekit's custom ops.

The Hugging Face modules keep their weights and their MLPs; what changes is the
wiring: norms become ``edgekit::rms_norm`` / ``edgekit::add_rms_norm`` and each
attention block becomes one ``edgekit::attention`` call with rotary and the KV
cache inside, so that lowering can map it onto a fused kernel per target.
"""

from __future__ import annotations

import torch
from torch import nn

import edgekit.export.ops  # noqa: F401  (registers torch.ops.edgekit.*)
from edgekit.export.archs.base import DecoderArch

ops = torch.ops.edgekit


def rotary_tables(model: nn.Module, arch: DecoderArch, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_pos, R/2) computed by the model's own rotary module.

    Using Hugging Face's module makes every rope variant (llama3, yarn, linear...) exact:
    the table holds what the model computes at each position, attention scaling included.
    """
    max_pos = arch.config.max_position_embeddings
    positions = torch.arange(max_pos).unsqueeze(0)  # (1, max_pos)
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = model.model.rotary_emb(probe, positions)  # (1, max_pos, R), halves duplicated
    half = cos.shape[-1] // 2
    if not torch.equal(cos[..., :half], cos[..., half:]):
        raise NotImplementedError("rotary tables with distinct halves (interleaved rope) are not supported yet")
    return cos[0, :, :half].to(dtype).contiguous(), sin[0, :, :half].to(dtype).contiguous()


class DecoderForExport(nn.Module):
    """forward(input_ids, attention_mask, *past) -> (logits, *presents).

    past/presents are flattened per layer as key, value; shapes (B, KV, P, D).
    Logits are float32 whatever the model dtype.
    """

    def __init__(self, model: nn.Module, arch: DecoderArch):
        super().__init__()
        self.arch = arch
        self.decoder = model.model
        self.lm_head = model.lm_head
        dtype = model.lm_head.weight.dtype
        cos, sin = rotary_tables(model, arch, dtype)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.eps = float(arch.config.rms_norm_eps)
        self.windows = [arch.layer_window(i) or 0 for i in range(arch.config.num_hidden_layers)]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        hidden = self.decoder.embed_tokens(input_ids)  # (B, S, hidden)
        residual = None
        presents: list[torch.Tensor] = []
        for i, layer in enumerate(self.decoder.layers):
            if residual is None:
                residual = hidden
                x = ops.rms_norm(hidden, layer.input_layernorm.weight, self.eps)
            else:
                x, residual = ops.add_rms_norm(hidden, residual, layer.input_layernorm.weight, self.eps)
            attn, key, value = self._attention(layer.self_attn, x, past[2 * i], past[2 * i + 1], attention_mask, i)
            presents += [key, value]
            x, residual = ops.add_rms_norm(attn, residual, layer.post_attention_layernorm.weight, self.eps)
            hidden = layer.mlp(x)
        hidden, _ = ops.add_rms_norm(hidden, residual, self.decoder.norm.weight, self.eps)
        logits = self.lm_head(hidden).float()  # (B, S, vocab)
        return (logits, *presents)

    def _attention(self, attn: nn.Module, x, past_key, past_value, mask, index: int):
        cfg = self.arch.config
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, self.arch.head_dim
        q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)  # (B, S, H*D), (B, S, KV*D) x2
        if self.arch.qk_norm:
            b, s = x.shape[0], x.shape[1]
            q = ops.rms_norm(q.view(b, s, heads, d), attn.q_norm.weight, self.eps).view(b, s, heads * d)
            k = ops.rms_norm(k.view(b, s, kv_heads, d), attn.k_norm.weight, self.eps).view(b, s, kv_heads * d)
        out, key, value = ops.attention(
            q, k, v, past_key, past_value, mask, self.cos_cache, self.sin_cache,
            heads, kv_heads, float(attn.scaling), self.windows[index], 0.0, index,
        )
        return attn.o_proj(out), key, value
