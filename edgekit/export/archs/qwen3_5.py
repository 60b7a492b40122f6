"""Qwen3.5 / Qwen3.6 (qwen3_5): three Gated DeltaNet layers per gated full-attention layer.

Linear-attention layers: causal conv with state + gated delta rule (edgekit ops), gated RMSNorm.
Attention layers: q_proj doubled into query + sigmoid output gate, per-head q/k norm, partial
rotary (text mRoPE reduces to plain rope on text positions: the tables carry it), and every
RMSNorm is (1 + w), folded into the weights before tracing.
"""

from __future__ import annotations


from edgekit.export.archs import register
from edgekit.export.archs.base import DecoderArch, tiny_common


@register
class Qwen3_5(DecoderArch):
    architectures = ("Qwen3_5ForCausalLM",)
    model_type = "qwen3_5_text"
    qk_norm = True
    attention_gate = True
    norm_class = "Qwen3_5RMSNorm"  # the (1 + w) norm class whose weights prepare() folds

    @staticmethod
    def tiny_config():
        return tiny_common(
            architectures=["Qwen3_5ForCausalLM"],
            model_type="qwen3_5_text",
            num_hidden_layers=4,  # linear, linear, linear, full
            head_dim=32,
            tie_word_embeddings=True,
            linear_conv_kernel_dim=4,
            linear_key_head_dim=16,
            linear_value_head_dim=16,
            linear_num_key_heads=2,
            linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
                             "mrope_section": [4, 2, 2]},
        )

    def layer_kind(self, index: int) -> str:
        kind = self.config.layer_types[index]
        return "linear_attention" if kind == "linear_attention" else "attention"

    def layer_window(self, index: int) -> int | None:
        return None

    def linear_states(self, index: int) -> dict[str, list[int]]:
        cfg = self.config
        key_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim
        channels = 2 * key_dim + cfg.linear_num_value_heads * cfg.linear_value_head_dim
        return {
            "conv": [channels, cfg.linear_conv_kernel_dim - 1],
            "recurrent": [cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim],
        }

    def prepare(self, wrapper) -> None:
        # Qwen3_5RMSNorm computes norm(x) * (1 + w); edgekit's op computes norm(x) * w'.
        # The gated norm inside Gated DeltaNet is a plain w and is left alone.
        heads = [wrapper.mtp] if wrapper.mtp is not None else []  # the MTP head's norms are (1 + w) too
        for module in (m for root in (wrapper.decoder, *heads) for m in root.modules()):
            if type(module).__name__ == self.norm_class:
                wrapper.derive(module, "weight", _one_plus)

    def mixer(self, wrapper, index, layer, x, states, mask):
        if self.layer_kind(index) == "linear_attention":
            return wrapper.gated_deltanet(layer.linear_attn, x, states[0], states[1], index)
        return super().mixer(wrapper, index, layer, x, states, mask)


@register
class Qwen3_5Multimodal(Qwen3_5):
    """The text model inside Qwen3.5/3.6 image-text checkpoints (e.g. Qwen3.6-27B); the vision tower stays behind."""

    architectures = ("Qwen3_5ForConditionalGeneration",)
    model_type = "qwen3_5"
    text_config = "text_config"
    auto_class = "AutoModelForImageTextToText"

    @staticmethod
    def tiny_config():
        text = Qwen3_5.tiny_config()
        for key in ("architectures", "model_type", "bos_token_id", "eos_token_id", "pad_token_id", "tie_word_embeddings"):
            text.pop(key)
        vision = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                  "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_position_embeddings": 16}
        return {"architectures": ["Qwen3_5ForConditionalGeneration"], "model_type": "qwen3_5", "text_config": text,
                "vision_config": vision, "tie_word_embeddings": True, "image_token_id": 2000, "video_token_id": 2001,
                "vision_start_token_id": 2002, "vision_end_token_id": 2003, "eos_token_id": 0}

    def decoder(self, model):
        return model.model.language_model


def _one_plus(w):
    return w + 1.0
