"""The module that is traced: a Hugging Face decoder rewired around edgekit's custom ops.

The Hugging Face modules keep their weights and their MLPs; what changes is the
wiring: norms become ``edgekit::rms_norm`` / ``edgekit::add_rms_norm``, each attention
block one ``edgekit::attention`` call (rotary and KV cache inside) and each Gated
DeltaNet block ``edgekit::causal_conv1d`` + ``edgekit::gated_delta_rule`` (states
inside), so that lowering can map them onto fused kernels per target.

The layer structure itself belongs to the family (``DecoderArch.layer``); this module
holds the blocks every family shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import edgekit.export.ops  # noqa: F401  (registers torch.ops.edgekit.*)
from edgekit.export.archs.base import DecoderArch
from edgekit.export.mtp import MtpHead

ops = torch.ops.edgekit


def rotary_tables(rotary: nn.Module, max_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables (max_pos, R/2) computed by the model's own rotary module.

    Using Hugging Face's module makes every rope variant (llama3, yarn, linear, partial,
    text mRoPE...) exact: the table holds what the model computes at each position,
    attention scaling included.
    """
    positions = torch.arange(max_pos).unsqueeze(0)  # (1, max_pos)
    probe = torch.zeros(1, dtype=torch.float32)
    cos, sin = rotary(probe, positions)  # (1, max_pos, R), halves duplicated
    half = cos.shape[-1] // 2
    if not torch.equal(cos[..., :half], cos[..., half:]):
        raise NotImplementedError("rotary tables with distinct halves (interleaved rope) are not supported yet")
    return cos[0, :, :half].to(dtype).contiguous(), sin[0, :, :half].to(dtype).contiguous()


class DecoderForExport(nn.Module):
    """forward(input_ids, attention_mask, *states) -> (logits, *new_states[, mtp_logits]).

    states follow ``edgekit.types.state_io``: per attention layer key, value
    (B, KV, P, D); per linear-attention layer conv (B, C, K-1), recurrent (B, Hv, dk, dv).
    Logits are float32 whatever the model dtype. A model given an MTP head (``model.mtp``,
    edgekit.export.mtp) runs it after the LM head, its layer's states last.
    """

    def __init__(self, model: nn.Module, arch: DecoderArch):
        super().__init__()
        self.arch = arch
        self.decoder = arch.decoder(model)
        self.lm_head = model.lm_head
        head = getattr(model, "mtp", None)
        # Registered here, so its weights are named mtp.*, as in the checkpoint (export --mtp).
        self.mtp = head if isinstance(head, MtpHead) else None
        self.eps = float(arch.config.rms_norm_eps)
        self.derived: dict[int, tuple[nn.Parameter, object]] = {}  # id(new param) -> (old param, fn)
        arch.prepare(self)
        dtype = model.lm_head.weight.dtype
        for name, rotary in arch.rotary_modules(self.decoder).items():
            cos, sin = rotary_tables(rotary, arch.config.max_position_embeddings, dtype)
            self.register_buffer(f"cos_{name}", cos, persistent=False)
            self.register_buffer(f"sin_{name}", sin, persistent=False)
        self.windows = [arch.layer_window(i) or 0 for i in range(arch.config.num_hidden_layers)]
        if self.mtp is not None:
            self.windows.append(0)  # the head's layer attends globally

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *states: torch.Tensor):
        hidden = self.arch.embed(self.decoder, input_ids)  # (B, S, hidden)
        residual = None
        new_states: list[torch.Tensor] = []
        position = 0
        for i, layer in enumerate(self.decoder.layers):
            layer_states = states[position : position + 2]  # every layer kind carries two tensors
            position += 2
            hidden, residual, produced = self.arch.layer(self, i, layer, hidden, residual, layer_states, attention_mask)
            new_states += produced
        hidden = self.arch.final_norm(self, hidden, residual)
        logits = self.arch.logits(self, hidden)  # (B, S, vocab) float32
        if self.mtp is None:
            return (logits, *new_states)
        from edgekit.export.mtp import mtp_forward

        mtp_logits, produced = mtp_forward(self, self.mtp, hidden, logits, states[position: position + 2], attention_mask)
        return (logits, *new_states, *produced, mtp_logits)

    def derive(self, module: nn.Module, name: str, fn) -> None:
        """Replace ``module.name`` by ``fn(it)``, recording how, for weights read later from the checkpoint.

        ``fn`` must be elementwise (it is also applied to row slices); it runs here on meta or
        real tensors alike, and again on each tensor read when the weights are streamed.
        """
        old = getattr(module, name)
        new = nn.Parameter(fn(old.detach()), requires_grad=False)
        setattr(module, name, new)
        self.derived[id(new)] = (old, fn)

    # -- blocks shared by the families ---------------------------------------------------------

    def norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, weight, self.eps)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
        """(norm(x + residual), x + residual)."""
        return ops.add_rms_norm(x, residual, weight, self.eps)

    def attention(self, attn: nn.Module, x, past_key, past_value, mask, index: int, rotary: str = "global",
                  scale: float | None = None, softcap: float = 0.0, gate: bool = False):
        """q/k/v projections (+ per-head q/k norm, + sigmoid output gate), edgekit::attention, o_proj."""
        cfg = self.arch.config
        heads, kv_heads, d = cfg.num_attention_heads, cfg.num_key_value_heads, self.arch.head_dim
        b, s = x.shape[0], x.shape[1]
        q = attn.q_proj(x)  # (B, S, H*D), or (B, S, H*2D) with an output gate
        if gate:
            q, gate_values = q.view(b, s, heads, 2 * d).chunk(2, dim=-1)  # (B, S, H, D) x2
            q, gate_values = q.reshape(b, s, heads * d), gate_values.reshape(b, s, heads * d)
        k, v = attn.k_proj(x), attn.v_proj(x)  # (B, S, KV*D) x2
        if self.arch.qk_norm:
            q = self.norm(q.view(b, s, heads, d), attn.q_norm.weight).view(b, s, heads * d)
            k = self.norm(k.view(b, s, kv_heads, d), attn.k_norm.weight).view(b, s, kv_heads * d)
        out, key, value = ops.attention(
            q, k, v, past_key, past_value, mask, getattr(self, f"cos_{rotary}"), getattr(self, f"sin_{rotary}"),
            heads, kv_heads, float(attn.scaling if scale is None else scale), self.windows[index], softcap, index,
        )
        if gate:
            out = out * torch.sigmoid(gate_values)
        return attn.o_proj(out), [key, value]

    def gated_deltanet(self, gdn: nn.Module, x, past_conv, past_recurrent, index: int):
        """Gated DeltaNet: projections, causal conv with state, gated delta rule, gated RMSNorm, out_proj."""
        b, s = x.shape[0], x.shape[1]
        hk, hv, dk, dv = gdn.num_k_heads, gdn.num_v_heads, gdn.head_k_dim, gdn.head_v_dim
        mixed, z, b_proj, a_proj = self.arch.deltanet_projections(gdn, x)  # z: (B, S, Hv, dv)
        mixed, conv_state = ops.causal_conv1d(mixed, gdn.conv1d.weight.squeeze(1), past_conv, 1)
        q, k, v = torch.split(mixed, [hk * dk, hk * dk, hv * dv], dim=-1)  # (B, S, Hk*dk) x2, (B, S, Hv*dv)
        beta = torch.sigmoid(b_proj)  # (B, S, Hv)
        # Decay in log space, in fp32: -exp(A_log) * softplus(a + dt_bias).
        g = -gdn.A_log.float().exp() * F.softplus(a_proj.float() + gdn.dt_bias)  # (B, S, Hv)
        out, recurrent = ops.gated_delta_rule(q, k, v, g, beta, past_recurrent, hk, hv, float(dk**-0.5))
        normed = self.norm(out.view(b, s, hv, dv), gdn.norm.weight)
        out = (normed.float() * F.silu(z.float())).to(x.dtype).reshape(b, s, hv * dv)  # (B, S, Hv*dv)
        return gdn.out_proj(out), [conv_state, recurrent]
