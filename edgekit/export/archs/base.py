"""The declarative description of a decoder-only family that the export wrapper reads."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar

from edgekit.errors import ConfigError
from edgekit.types import LayerSpec, ModelSpec

# Fields every family needs in config.json itself; transformers would silently fill in
# its defaults (a 4096-wide model), so a config.json missing one is refused by name.
REQUIRED_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size", "intermediate_size")


class DecoderArch:
    """A Llama-shaped decoder: embed -> [norm, attention, norm, MLP] x L -> norm -> LM head.

    Subclasses are mostly attributes; the Hugging Face module tree they describe is
    ``model.model.{embed_tokens, layers[i].{input_layernorm, self_attn, post_attention_layernorm,
    mlp}, norm, rotary_emb}`` and ``model.lm_head``.
    """

    architectures: ClassVar[tuple[str, ...]] = ()
    model_type: ClassVar[str] = ""
    qk_norm: ClassVar[bool] = False  # per-head RMSNorm on q and k before rotary (Qwen3)
    attention_gate: ClassVar[bool] = False  # q_proj doubled into query + sigmoid output gate (Qwen3.5)
    text_config: ClassVar[str | None] = None  # multimodal checkpoints: the sub-config of the text model
    auto_class: ClassVar[str] = "AutoModelForCausalLM"  # the transformers class that loads the checkpoint

    def __init__(self, config: Any, config_path: Path | None = None):
        self.full_config = config
        self.config = getattr(config, self.text_config) if self.text_config else config
        self.config_path = config_path
        raw = json.loads(config_path.read_text()) if config_path is not None else config.to_dict()
        if self.text_config:
            raw = raw.get(self.text_config) or {}
        for name in REQUIRED_FIELDS:
            if raw.get(name) is None:
                raise ConfigError(f"{config_path or 'the model config'} has no {name!r}", f"add {name!r} to config.json")

    @staticmethod
    def tiny_config() -> dict[str, Any]:
        """A tiny config of this family (random weights) for tests and presets."""
        raise NotImplementedError

    @property
    def head_dim(self) -> int:
        # Hugging Face's own rule: an explicit head_dim wins (Qwen3 sets it != hidden/heads).
        explicit = getattr(self.config, "head_dim", None)
        return int(explicit) if explicit else self.config.hidden_size // self.config.num_attention_heads

    # -- hooks the export wrapper calls (edgekit/export/wrapper.py) ------------------------------

    def decoder(self, model: Any) -> Any:
        """The module holding embed_tokens, layers, norm and rotary_emb."""
        return model.model

    def prepare(self, wrapper: Any) -> None:
        """Adjust weights once before tracing (e.g. fold a (1 + w) norm into w)."""

    def rotary_modules(self, decoder: Any) -> dict[str, Any]:
        """Rotary modules by table name; layers pick a table with ``rotary_table``."""
        return {"global": decoder.rotary_emb}

    def rotary_table(self, index: int) -> str:
        return "global"

    def embed(self, decoder: Any, input_ids: Any) -> Any:
        return decoder.embed_tokens(input_ids)

    def layer(self, wrapper: Any, index: int, layer: Any, hidden: Any, residual: Any, states: tuple, mask: Any):
        """One pre-norm block; the residual add is fused into the next norm.

        Returns (hidden, residual, new states); the true stream is hidden + residual.
        """
        if residual is None:
            residual, x = hidden, wrapper.norm(hidden, layer.input_layernorm.weight)
        else:
            x, residual = wrapper.add_norm(hidden, residual, layer.input_layernorm.weight)
        out, produced = self.mixer(wrapper, index, layer, x, states, mask)
        x, residual = wrapper.add_norm(out, residual, layer.post_attention_layernorm.weight)
        return self.feed_forward(wrapper, layer, x), residual, produced

    def feed_forward(self, wrapper: Any, layer: Any, x: Any) -> Any:
        """The layer's MLP (Hugging Face's module, traced as it is)."""
        return layer.mlp(x)

    def deltanet_projections(self, gdn: Any, x: Any):
        """Gated DeltaNet inputs: (mixed q|k|v (B, S, C), z (B, S, Hv, dv), b and a (B, S, Hv))."""
        b, s = x.shape[0], x.shape[1]
        z = gdn.in_proj_z(x).view(b, s, gdn.num_v_heads, gdn.head_v_dim)
        return gdn.in_proj_qkv(x), z, gdn.in_proj_b(x), gdn.in_proj_a(x)

    def mixer(self, wrapper: Any, index: int, layer: Any, x: Any, states: tuple, mask: Any):
        """The token mixer of layer ``index``: (output, new states)."""
        return wrapper.attention(layer.self_attn, x, states[0], states[1], mask, index,
                                 rotary=self.rotary_table(index), gate=self.attention_gate)

    def final_norm(self, wrapper: Any, hidden: Any, residual: Any) -> Any:
        return wrapper.add_norm(hidden, residual, wrapper.decoder.norm.weight)[0]

    def logits(self, wrapper: Any, hidden: Any) -> Any:
        return wrapper.lm_head(hidden).float()

    # -- what the layers carry -----------------------------------------------------------------

    def layer_kind(self, index: int) -> str:
        """'attention', 'sliding_attention' or 'linear_attention'."""
        return "sliding_attention" if self.layer_window(index) else "attention"

    def linear_states(self, index: int) -> dict[str, list[int]]:
        """Per-sequence state shapes of a linear-attention layer."""
        raise NotImplementedError

    def layer_window(self, index: int) -> int | None:
        """Tokens a query of this layer sees (itself included), or None for global attention."""
        types = getattr(self.config, "layer_types", None)
        window = getattr(self.config, "sliding_window", None)
        if types is not None:
            return window if types[index] == "sliding_attention" else None
        return window

    def layers(self) -> tuple[LayerSpec, ...]:
        cfg = self.config
        specs = []
        for i in range(cfg.num_hidden_layers):
            kind = self.layer_kind(i)
            if kind == "linear_attention":
                specs.append(LayerSpec(i, kind, states=self.linear_states(i)))
            else:
                specs.append(LayerSpec(i, kind, cfg.num_key_value_heads, self.head_dim, self.layer_window(i)))
        return tuple(specs)

    def spec(self, source: str, generation: dict[str, Any]) -> ModelSpec:
        cfg = self.config
        eos = generation.get("eos_token_id", getattr(cfg, "eos_token_id", None))
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        return ModelSpec(
            source=source,
            architecture=cfg.architectures[0] if getattr(cfg, "architectures", None) else self.architectures[0],
            model_type=cfg.model_type,
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_heads=cfg.num_attention_heads,
            num_kv_heads=cfg.num_key_value_heads,
            head_dim=self.head_dim,
            vocab_size=cfg.vocab_size,
            max_position_embeddings=cfg.max_position_embeddings,
            tie_word_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            eos_token_ids=eos_ids,
            bos_token_id=generation.get("bos_token_id", getattr(cfg, "bos_token_id", None)),
        )


def tiny_common(**overrides: Any) -> dict[str, Any]:
    """Dimensions shared by the tiny test configs; head_dim % 16 == 0 keeps the ort target's rotary
    inside GroupQueryAttention (other head sizes: tests/export/test_gqa_rotary.py)."""
    base = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": 2048,
        "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6,
        "initializer_range": 0.1,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    base.update(overrides)
    return base
