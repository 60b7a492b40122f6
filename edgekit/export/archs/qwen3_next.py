"""Qwen3-Next: Qwen3.5's mixers (Gated DeltaNet + gated attention) with a sparse MoE feed-forward.

Differences from qwen3_5: the DeltaNet projections come fused and grouped per key head
(in_proj_qkvz, in_proj_ba, reordered by Hugging Face's own fix_query_key_value_ordering), and
feed-forward layers are routed experts (edgekit::moe) plus a sigmoid-gated shared expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from edgekit.export.archs import register
from edgekit.export.archs.qwen3_5 import Qwen3_5

ops = torch.ops.edgekit


@register
class Qwen3Next(Qwen3_5):
    architectures = ("Qwen3NextForCausalLM",)
    model_type = "qwen3_next"
    norm_class = "Qwen3NextRMSNorm"

    @staticmethod
    def tiny_config():
        config = Qwen3_5.tiny_config()
        config.pop("rope_parameters")
        config.update(
            architectures=["Qwen3NextForCausalLM"], model_type="qwen3_next", partial_rotary_factor=0.5,
            rope_theta=10000.0, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
            shared_expert_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True,
            mlp_only_layers=[1],  # one dense layer among the sparse ones
        )
        return config

    def deltanet_projections(self, gdn, x):
        q, k, v, z, b, a = gdn.fix_query_key_value_ordering(gdn.in_proj_qkvz(x), gdn.in_proj_ba(x))
        flat = lambda t: t.reshape(t.shape[0], t.shape[1], -1)  # noqa: E731  (B, S, N, d) -> (B, S, N*d)
        return torch.cat([flat(q), flat(k), flat(v)], dim=-1), z, b, a

    def feed_forward(self, wrapper, layer, x):
        block = layer.mlp
        if not hasattr(block, "experts"):
            return block(x)
        logits = F.linear(x, block.gate.weight)  # (B, S, E)
        routed = ops.moe(x, logits, block.experts.gate_up_proj, block.experts.down_proj,
                         block.gate.top_k, int(block.gate.norm_topk_prob))
        shared = torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)
        return routed + shared
