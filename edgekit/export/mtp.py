"""Qwen3.5 / Qwen3.6 multi-token prediction (MTP) head: the module, its weights, its place in the export.

Checkpoints ship ``mtp.*`` tensors that transformers drops on load (``mtp_num_hidden_layers`` in the
config). The computation (as vLLM's and genai's Qwen3-Next/3.5 MTP run it)::

    token x_{t+1} ─embed_tokens (shared)─ pre_fc_norm_embedding ─┐
                                                                 cat (embedding first) ─ fc (2H -> H)
    target hidden h_t (final norm's output) ─ pre_fc_norm_hidden ─┘
        ─ one full-attention decoder layer (mtp.layers.0, its own KV cache) ─ mtp.norm ─ LM head (shared) -> x_{t+2}

Every norm is Qwen3.5's (1 + w) RMSNorm. ``export --mtp`` traces the head inside the target's graph
(``mtp_forward``): one forward verifies the proposals and proposes the next token, so a round of
speculation costs one call, not two. Its layer is one more attention layer of the graph (KV cache
``past_key_values.N.*``, N = the target's layer count), its logits the ``mtp_logits`` output, and the
token it pairs with row t is the target's own greedy choice at t (the ArgMax of row t's logits).
That is the committed token wherever greedy decoding commits, and for prompt rows, where the real
next token is known, it made no measurable difference to acceptance (benchmarks/SPECULATIVE.md).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from edgekit.types import LayerSpec

MTP_PREFIX = "mtp."


def mtp_layers(config) -> int:
    """How many MTP layers a config declares (0: none)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "mtp_num_hidden_layers", None) or getattr(config, "mtp_num_hidden_layers", 0) or 0)


class MtpHead(nn.Module):
    """forward(embeds (B, S, H), hidden (B, S, H), position_embeddings) -> hidden (B, S, H), normed.

    Parameter names are the checkpoint's after ``mtp.``; the attention runs causally over S
    (training); the export runs the same modules around edgekit's attention op (``mtp_forward``).
    """

    def __init__(self, config):
        super().__init__()
        from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5DecoderLayer, Qwen3_5RMSNorm

        layer_config = copy.deepcopy(config)
        layer_config.layer_types = ["full_attention"]
        layer_config.num_hidden_layers = 1
        layer_config._attn_implementation = "sdpa"  # with no mask: causal (eager would attend to every row)
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * hidden, hidden, bias=False)
        self.pre_fc_norm_embedding = Qwen3_5RMSNorm(hidden, eps=eps)
        self.pre_fc_norm_hidden = Qwen3_5RMSNorm(hidden, eps=eps)
        self.layers = nn.ModuleList([Qwen3_5DecoderLayer(layer_config, 0)])
        self.norm = Qwen3_5RMSNorm(hidden, eps=eps)

    def fuse(self, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's input: fc(cat(norm(embedding), norm(hidden))), (B, S, H)."""
        both = torch.cat([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)  # (B, S, 2H)
        return self.fc(both)

    def forward(self, embeds: torch.Tensor, hidden: torch.Tensor, position_embeddings) -> torch.Tensor:
        x = self.fuse(embeds, hidden)
        x = self.layers[0](x, position_embeddings=position_embeddings, attention_mask=None)  # causal (sdpa)
        return self.norm(x)


def load_head(folder, config) -> MtpHead:
    """The MTP head with its ``mtp.*`` weights read from the checkpoint's safetensors."""
    from pathlib import Path

    from safetensors import safe_open

    head = MtpHead(getattr(config, "text_config", None) or config)
    wanted = {MTP_PREFIX + name for name in head.state_dict()}
    tensors = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in wanted:
                    tensors[key.removeprefix(MTP_PREFIX)] = f.get_tensor(key)
    missing = sorted(wanted - {MTP_PREFIX + k for k in tensors})
    if missing:
        from edgekit.errors import ArtifactError

        raise ArtifactError(f"{folder} declares an MTP head but has no {missing[0]} (and {len(missing) - 1} more)",
                            "export without --mtp, or use the original checkpoint (it ships mtp.* tensors)")
    head.load_state_dict({k: v.float() for k, v in tensors.items()})
    return head.eval()


# -- export -------------------------------------------------------------------------------------
# The embedding the head shares, by its usual checkpoint names.
EMBED_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight")


def attach_head(hf_model, folder, config, on_meta: bool) -> None:
    """Give ``hf_model`` the head as ``hf_model.mtp``: parameter names ``mtp.*`` are the checkpoint's, so a
    streamed export reads them like any weight. ``on_meta``: built without memory (the weights stream);
    else loaded now (a model held in memory)."""
    import torch

    text = getattr(config, "text_config", None) or config
    if on_meta:
        with torch.device("meta"):
            head = MtpHead(text)
    else:
        head = load_head(folder, config)
    hf_model.mtp = head.to(hf_model.lm_head.weight.dtype)


def mtp_layer(arch) -> LayerSpec:
    """The head's attention layer, after the target's: what a runtime allocates for its KV cache."""
    cfg = arch.config
    return LayerSpec(cfg.num_hidden_layers, "attention", cfg.num_key_value_heads, arch.head_dim)


def mtp_forward(wrapper, head: MtpHead, hidden, logits, states: tuple, mask):
    """The head over every row of a step: row t pairs the target's final hidden h_t with the embedding of
    its greedy token at t. -> (mtp_logits (B, S, vocab) float32, [key, value])."""
    arch, decoder = wrapper.arch, wrapper.decoder
    index = arch.config.num_hidden_layers
    tokens = logits.argmax(dim=-1)  # (B, S): the target's own next token at each row
    embeds = wrapper.norm(arch.embed(decoder, tokens), head.pre_fc_norm_embedding.weight)
    x = head.fc(torch.cat([embeds, wrapper.norm(hidden, head.pre_fc_norm_hidden.weight)], dim=-1))  # (B, S, H)
    layer = head.layers[0]
    residual, x = x, wrapper.norm(x, layer.input_layernorm.weight)
    out, produced = wrapper.attention(layer.self_attn, x, states[0], states[1], mask, index,
                                      rotary=arch.rotary_table(index), gate=arch.attention_gate)
    x, residual = wrapper.add_norm(out, residual, layer.post_attention_layernorm.weight)
    out = wrapper.add_norm(arch.feed_forward(wrapper, layer, x), residual, head.norm.weight)[0]
    return arch.logits(wrapper, out), produced


def check_mtp(model: str, vocab: int | None = None):
    """(folder, config) of ``model`` when it has a Qwen3.5 MTP head with its tensors (and ``vocab``, the
    head's ``--mtp-vocab``, fits its vocabulary); else the error that says so. Reads the config and the
    safetensors' key lists only: a refusal comes before any export."""
    from edgekit.errors import ConfigError
    from edgekit.export import resolve

    folder = resolve.resolve_model(model)
    config = resolve.load_config(folder)
    text = getattr(config, "text_config", None) or config
    if mtp_layers(config) != 1 or text.model_type not in ("qwen3_5_text", "qwen3_5"):
        raise ConfigError(f"{model} has no Qwen3.5 MTP head (mtp_num_hidden_layers: {mtp_layers(config)}, "
                          f"model_type {text.model_type})",
                          "--mtp applies to Qwen3.5/3.6 checkpoints that ship mtp.* tensors (mtp_num_hidden_layers: 1), "
                          "e.g. the tiny-code-mtp preset")
    if vocab is not None and not 2 <= vocab <= text.vocab_size:
        raise ConfigError(f"--mtp-vocab {vocab} is outside 2..{text.vocab_size} ({model}'s vocabulary)",
                          "e.g. --mtp-vocab 32768, or leave it out for the whole vocabulary")
    _check_tensors(model, folder, config)
    return folder, config


def _check_tensors(model: str, folder, config) -> None:
    """Refuse a checkpoint whose safetensors lack mtp.* tensors or the embedding the head shares."""
    from edgekit.errors import ArtifactError

    keys = _checkpoint_keys(folder)
    hint = "use the original checkpoint (it ships mtp.* tensors), or export without --mtp"
    if not any(key.startswith(MTP_PREFIX) for key in keys):
        raise ArtifactError(f"{model} declares an MTP head (mtp_num_hidden_layers: 1) but its safetensors hold "
                            "no mtp.* tensors (a re-saved checkpoint drops them: transformers does not load them)", hint)
    with torch.device("meta"):  # the head's parameter names, without allocating it
        wanted = {MTP_PREFIX + name for name in MtpHead(getattr(config, "text_config", None) or config).state_dict()}
    missing = sorted(wanted - keys)
    if missing:
        raise ArtifactError(f"{model}'s safetensors have no {missing[0]} (and {len(missing) - 1} more) "
                            "of its MTP head", hint)
    if not any(key in EMBED_NAMES for key in keys):
        raise ArtifactError(f"{model}'s safetensors hold no embedding ({' or '.join(EMBED_NAMES)}), "
                            "which the MTP head shares", hint)


def _checkpoint_keys(folder) -> set[str]:
    """Every tensor name in the checkpoint's safetensors (their headers only)."""
    from pathlib import Path

    from safetensors import safe_open

    keys: set[str] = set()
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    return keys


def narrow_head(model, vocab: int) -> bool:
    """Make the head's LM head read only the first ``vocab`` rows of the model's (ids 0..vocab-1), in the
    traced graph whose weights are still recipes: ``mtp_logits`` becomes (B, S, vocab) and the head's
    share of a forward drops by (V - vocab) x H weights (a 248k-token table is most of a 0.8B model).

    Byte-level BPE vocabularies number tokens in merge order, most frequent merges first, so the
    first ids are the common ones (FR-Spec / EAGLE-3 draft vocabularies pick by corpus frequency).
    Returns False when the head already reads no more rows than that."""
    import onnx_ir as ir

    from edgekit.export.lazy import make, recipe_of
    from edgekit.types import MTP_LOGITS

    output = next(v for v in model.graph.outputs if v.name == MTP_LOGITS)
    node, chain = output.producer(), [output]
    while node.op_type != "MatMul":  # the head's LM head, behind its float32 Cast
        chain.append(node.inputs[0])
        node = node.inputs[0].producer()
    weight = node.inputs[1]
    recipe = recipe_of(weight)
    hidden, full = weight.shape
    if recipe is None or recipe.by_source_rows() != "columns" or full <= vocab:
        return False
    tensor = make(lambda rows: recipe.load(rows or (0, vocab)), weight.const_value.dtype, (hidden, vocab),
                  "mtp.lm_head.weight.transpose", recipe.steps)
    narrow = ir.Value(name=tensor.name, shape=ir.Shape((hidden, vocab)), type=weight.type, const_value=tensor)
    model.graph.register_initializer(narrow)
    node.replace_input_with(1, narrow)
    for value in chain:
        value.shape = ir.Shape([*list(value.shape)[:-1], vocab])
    return True
