"""Qwen3.5 / Qwen3.6 multi-token prediction (MTP) head: the module, its weights, its export.

Checkpoints ship ``mtp.*`` tensors that transformers drops on load (``mtp_num_hidden_layers`` in the
config). The computation (as vLLM's and genai's Qwen3-Next/3.5 MTP run it)::

    token x_{t+1} ─embed_tokens (shared)─ pre_fc_norm_embedding ─┐
                                                                 cat (embedding first) ─ fc (2H -> H)
    target hidden h_t (final norm's output) ─ pre_fc_norm_hidden ─┘
        ─ one full-attention decoder layer (mtp.layers.0, its own KV cache) ─ mtp.norm ─┬─ LM head (shared) -> x_{t+2}
                                                                                        └─ hidden, for chaining
Every norm is Qwen3.5's (1 + w) RMSNorm.
"""

from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn

# The MTP graph's I/O names and folder live with the proposer, which run and serve import without torch.
from edgekit.types import HIDDEN_INPUT, HIDDEN_OUTPUT, MTP_FOLDER

MTP_PREFIX = "mtp."


def mtp_layers(config) -> int:
    """How many MTP layers a config declares (0: none)."""
    text = getattr(config, "text_config", None) or config
    return int(getattr(text, "mtp_num_hidden_layers", None) or getattr(config, "mtp_num_hidden_layers", 0) or 0)


class MtpHead(nn.Module):
    """forward(embeds (B, S, H), hidden (B, S, H), position_embeddings) -> hidden (B, S, H), normed.

    Parameter names are the checkpoint's after ``mtp.``; the attention runs causally over S
    (training); the export wraps the same modules around edgekit's attention op with a KV cache.
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
# The shared embedding (and an untied LM head) by their usual checkpoint names.
SHARED_NAMES = {"model.embed_tokens.weight": "embed", "model.language_model.embed_tokens.weight": "embed",
                "lm_head.weight": "lm_head"}


def export_mtp(model: str, export_dir):
    """Add MTP to the export in ``export_dir`` of ``model``: the target gains a ``hidden_states``
    output, and ``export_dir/mtp`` holds the head as its own graph (same target and dtype).

    Returns the MTP graph's ExportedGraph.
    """
    from pathlib import Path

    from edgekit.types import ExportedGraph

    export_dir = Path(export_dir)
    target = ExportedGraph.load(export_dir)
    folder, config = check_mtp(model)
    head = _export_head(folder, config, target, export_dir / MTP_FOLDER)
    add_hidden_output(target)  # last: a failed head export leaves the target as it was
    return head


def check_mtp(model: str):
    """(folder, config) of ``model`` when it has a Qwen3.5 MTP head with its tensors; else the error that
    says so. Reads the config and the safetensors' key lists only: a refusal comes before any export."""
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
    if not any(SHARED_NAMES.get(key) == "embed" for key in keys):
        raise ArtifactError(f"{model}'s safetensors hold no embedding ({' or '.join(list(SHARED_NAMES)[:2])}), "
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


def add_hidden_output(graph) -> None:
    """Expose the LM head's input (the final norm's output) as the ``hidden_states`` output, in place."""
    import onnx

    from edgekit.types import TensorSpec

    path = graph.model_path
    proto = onnx.load(str(path), load_external_data=False)
    if HIDDEN_OUTPUT in {o.name for o in proto.graph.output}:
        return
    producers = {out: node for node in proto.graph.node for out in node.output}
    node = producers[proto.graph.output[0].name]  # logits
    while node.op_type != "MatMul":  # the LM head, maybe behind a Cast to float32
        node = producers[node.input[0]]
    hidden = node.input[0]
    elem = onnx.TensorProto.FLOAT16 if graph.dtype == "fp16" else onnx.TensorProto.FLOAT
    proto.graph.output.append(onnx.helper.make_tensor_value_info(
        hidden, elem, ["batch_size", "sequence_length", graph.model.hidden_size]))
    if hidden != HIDDEN_OUTPUT:  # an Identity gives it the contract's name
        proto.graph.node.append(onnx.helper.make_node("Identity", [hidden], [HIDDEN_OUTPUT], name="/model/hidden_out"))
        proto.graph.output[-1].name = HIDDEN_OUTPUT
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp))
    tmp.replace(path)
    dtype = "float16" if graph.dtype == "fp16" else "float32"
    spec = TensorSpec(HIDDEN_OUTPUT, dtype, ("batch_size", "sequence_length", graph.model.hidden_size))
    dataclasses.replace(graph, outputs=(*graph.outputs, spec)).save()


def _head_model(folder, config):
    """A one-layer Qwen3.5 holding the MTP head's weights (+ the shared embedding and LM head)."""
    import transformers

    head = load_head(folder, config)
    text = copy.deepcopy(getattr(config, "text_config", None) or config)
    text.num_hidden_layers, text.layer_types = 1, ["full_attention"]
    text.architectures = ["Qwen3_5ForCausalLM"]
    model = transformers.Qwen3_5ForCausalLM(text).float().eval()
    shared = _shared_weights(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(shared["embed"])
        model.lm_head.weight = model.model.embed_tokens.weight if "lm_head" not in shared else nn.Parameter(shared["lm_head"])
    decoder = model.model
    decoder.layers[0], decoder.norm = head.layers[0], head.norm
    decoder.mtp_fc = head.fc
    decoder.pre_fc_norm_embedding, decoder.pre_fc_norm_hidden = head.pre_fc_norm_embedding, head.pre_fc_norm_hidden
    return model, text


def _shared_weights(folder) -> dict[str, torch.Tensor]:
    """The embedding (and an untied LM head) from the checkpoint, by their usual names."""
    from pathlib import Path

    from safetensors import safe_open

    from edgekit.errors import ArtifactError

    found = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                if key in SHARED_NAMES:
                    found[SHARED_NAMES[key]] = f.get_tensor(key).float()
    if "embed" not in found:  # check_mtp refuses this first; kept for callers that skip it
        raise ArtifactError(f"{folder} has no embedding ({' or '.join(list(SHARED_NAMES)[:2])}) for the MTP head",
                            "use the original checkpoint's safetensors, or export without --mtp")
    return found


class MtpForExport(nn.Module):
    """forward(input_ids, target_hidden_states, attention_mask, key, value) -> (logits, key, value, hidden_states).

    Row i pairs the target's hidden state at position p + i with the token at p + i + 1; the layer's
    KV cache holds one row per target position, like the target's.
    """

    def __init__(self, model, arch):
        super().__init__()
        from edgekit.export.wrapper import DecoderForExport

        self.inner = DecoderForExport(model, arch)  # folds the (1 + w) norms, holds rotary tables and blocks

    def forward(self, input_ids, target_hidden, attention_mask, past_key, past_value):
        w = self.inner
        d = w.decoder
        embeds = w.norm(w.arch.embed(d, input_ids), d.pre_fc_norm_embedding.weight)  # (B, S, H)
        hidden = w.norm(target_hidden.to(embeds.dtype), d.pre_fc_norm_hidden.weight)  # (B, S, H)
        x = d.mtp_fc(torch.cat([embeds, hidden], dim=-1))  # (B, S, 2H) -> (B, S, H)
        x, residual, states = w.arch.layer(w, 0, d.layers[0], x, None, (past_key, past_value), attention_mask)
        out = w.arch.final_norm(w, x, residual)
        return (w.arch.logits(w, out), *states, out)


def _export_head(folder, config, target, out):
    """Trace MtpForExport, lower it for the target's target, write it with its sidecar into ``out``."""
    import shutil

    import onnxscript

    from edgekit.export import _name_present_dims, checkpoint, lazy
    from edgekit.export.archs import arch_for
    from edgekit.export.lower import lower

    model, text = _head_model(folder, config)
    if target.dtype == "fp16":
        model = model.half()
    arch = arch_for(text, None)
    wrapper = MtpForExport(model, arch).eval()
    onnx_model = _trace(wrapper, arch, target.model.hidden_size)
    _name_present_dims(onnx_model)
    checkpoint.attach(onnx_model, wrapper.inner, model, checkpoint.StateDict(model))
    lazy.fold(onnx_model)
    onnxscript.optimizer.optimize_ir(onnx_model, should_fold=lazy.is_lazy_input)
    lower(onnx_model, target.target)
    lazy.fold(onnx_model)
    work = out.with_name(f".{out.name}.partial")  # beside out: the swap is a rename
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        graph = _write_head(onnx_model, arch, folder, target, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-written head left in the export
        raise
    _swap_in(work, out)
    return dataclasses.replace(graph, path=out)


def _write_head(onnx_model, arch, folder, target, work):
    """The head's weights, graph and sidecar, written into ``work``; its ExportedGraph."""
    import onnx_ir as ir

    from edgekit.export import _custom_ops, _op_types, _specs
    from edgekit.export.lower import TARGET_OPSETS
    from edgekit.export.writer import write_weights

    written = write_weights(onnx_model, work, "model.onnx.data", ["mtp", str(folder)], progress=False)
    ir.save(onnx_model, work / "model.onnx")
    graph = dataclasses.replace(
        target, path=work, model=dataclasses.replace(target.model, num_layers=1), opset=TARGET_OPSETS[target.target],
        custom_ops=tuple(_custom_ops(onnx_model.graph)), inputs=_specs(onnx_model.graph.inputs),
        outputs=_specs(onnx_model.graph.outputs), layers=arch.layers(), ops=_op_types(onnx_model.graph),
        model_file="model.onnx", tokenizer_files=(), quantization=None, weights=written)
    graph.save()
    return graph


def _swap_in(work, out) -> None:
    """Replace ``out`` by the finished ``work`` folder: an old head stays until the new one is complete."""
    import shutil

    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    work.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _trace(wrapper, arch, hidden_size: int):
    """torch.onnx (dynamo) export of the MTP wrapper; edgekit ops become ai.edgekit nodes."""
    from edgekit.export import TRACE_EXAMPLE
    from edgekit.export.ops import TRANSLATIONS

    layer = arch.layers()[0]
    batch, seq, past_len = TRACE_EXAMPLE
    dim = torch.export.Dim
    b, s = dim("batch_size"), dim("sequence_length")
    t, p = dim("total_sequence_length"), dim("past_sequence_length", min=0)
    cache = torch.zeros(batch, layer.num_kv_heads, past_len, layer.head_dim)
    dtype = wrapper.inner.lm_head.weight.dtype
    cache = cache.to(dtype)
    example = (torch.zeros(batch, seq, dtype=torch.int64), torch.zeros(batch, seq, hidden_size, dtype=dtype),
               torch.ones(batch, past_len + seq, dtype=torch.int64), cache, cache.clone())
    dynamic = ({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: t}, {0: b, 2: p}, {0: b, 2: p})
    with torch.no_grad():
        program = torch.onnx.export(
            wrapper, example, dynamo=True, dynamic_shapes=dynamic, custom_translation_table=TRANSLATIONS,
            input_names=["input_ids", HIDDEN_INPUT, "attention_mask", "past_key_values.0.key", "past_key_values.0.value"],
            output_names=["logits", "present.0.key", "present.0.value", HIDDEN_OUTPUT],
            opset_version=23, optimize=False, verify=False, report=False, verbose=False)
    return program.model
