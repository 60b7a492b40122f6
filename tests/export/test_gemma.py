"""Gemma 2 and Gemma 3 text: sliding windows, softcaps, (1 + w) norms and per-type rope, checked to fail."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from edgekit.types import TARGETS

GEMMA2, GEMMA3 = "Gemma2ForCausalLM", "Gemma3ForCausalLM"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("architecture", [GEMMA2, GEMMA3])
def test_prompt_longer_than_the_window(exported, hf_folder, architecture, target):
    from edgekit.validate import validate

    # 40 tokens against a 16-token window: the prompt itself already slides past it.
    report = validate(exported(architecture, target), str(hf_folder(architecture)), prompt_length=40, steps=32)
    assert report.greedy_match == report.greedy_total == 32
    assert report.max_abs_diff < 1e-3


# -- eager checks on the wrapper: exact with Hugging Face, and each detail is load-bearing -----

@pytest.fixture(scope="module")
def noisy_folder(hf_folder, tmp_path_factory):
    """factory(architecture) -> hf_folder's model with random norm weights (they are saved as zeros)."""
    import transformers

    from edgekit.export.presets import TOKENIZER_DIR

    made = {}

    def make(architecture):
        if architecture not in made:
            source = hf_folder(architecture)
            model = getattr(transformers, architecture).from_pretrained(source)
            torch.manual_seed(7)
            with torch.no_grad():
                for name, weight in model.named_parameters():
                    if "norm" in name:
                        weight.normal_(0.0, 0.5)
            folder = tmp_path_factory.mktemp(f"{architecture}-noisy-norms")
            model.save_pretrained(folder)
            for item in TOKENIZER_DIR.iterdir():
                shutil.copy(item, folder / item.name)
            made[architecture] = folder
        return made[architecture]

    return make


def _difference(folder, change=None, length=40):
    """Max |logit| difference between the wrapper (after ``change(wrapper, arch)``) and Hugging Face."""
    from edgekit.export import resolve
    from edgekit.export.archs import arch_for
    from edgekit.export.wrapper import DecoderForExport

    config = resolve.load_config(folder)
    reference = resolve.load_model(folder, config)
    # prepare() folds weights in place: the wrapper gets its own copy of the model.
    arch = arch_for(resolve.load_config(folder), folder / "config.json")
    wrapper = DecoderForExport(resolve.load_model(folder, arch.config), arch).eval()
    if change is not None:
        change(wrapper, arch)
    ids = torch.randint(1, arch.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(0))
    past = [torch.zeros(1, arch.config.num_key_value_heads, 0, arch.head_dim)] * (2 * arch.config.num_hidden_layers)
    with torch.no_grad():
        got = wrapper(ids, torch.ones_like(ids), *past)[0]
        want = reference(ids).logits
    return float((got - want).abs().max())


@pytest.mark.parametrize("architecture", [GEMMA2, GEMMA3])
def test_one_plus_w_norms_fold_exactly(noisy_folder, architecture):
    assert _difference(noisy_folder(architecture)) < 1e-5


def _no_window(wrapper, arch):
    wrapper.windows = [0] * len(wrapper.windows)


def _window_shifted(by):
    def change(wrapper, arch):
        wrapper.windows = [w + by if w else 0 for w in wrapper.windows]
    return change


def _head_dim_scale(wrapper, arch):
    arch.config.query_pre_attn_scalar = arch.head_dim  # the Llama scale, not Gemma's


def _no_attention_softcap(wrapper, arch):
    arch.attention_softcap = lambda: 0.0


def _no_final_softcap(wrapper, arch):
    arch.config.final_logit_softcapping = None


def _local_layers_on_global_rope(wrapper, arch):
    wrapper.cos_local, wrapper.sin_local = wrapper.cos_global, wrapper.sin_global


@pytest.mark.parametrize("architecture, change", [
    (GEMMA2, _no_window), (GEMMA2, _window_shifted(1)), (GEMMA2, _window_shifted(-1)),
    (GEMMA2, _head_dim_scale), (GEMMA2, _no_attention_softcap), (GEMMA2, _no_final_softcap),
    (GEMMA3, _no_window), (GEMMA3, _window_shifted(1)), (GEMMA3, _head_dim_scale),
    (GEMMA3, _local_layers_on_global_rope),
], ids=lambda x: x if isinstance(x, str) else x.__qualname__.split(".")[0])
def test_each_gemma_detail_changes_the_result(noisy_folder, architecture, change):
    """Guards the parity tests: with any one detail dropped, a 40-token prompt must differ from HF."""
    assert _difference(noisy_folder(architecture), change) > 1e-2


# -- what the graphs hold ----------------------------------------------------------------------

def _nodes(exported, architecture, target, op_type):
    model = onnx.load(str(exported(architecture, target) / "model.onnx"))
    return model, [node for node in model.graph.node if node.op_type == op_type]


def _attr(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_gemma2_graphs_softcap_the_attention_scores(exported):
    from edgekit.export.archs import families

    cap = families()[GEMMA2].tiny_config()["attn_logit_softcapping"]
    _, gqa = _nodes(exported, GEMMA2, "ort", "GroupQueryAttention")
    assert [_attr(n, "softcap") for n in gqa] == [cap] * 4
    _, attention = _nodes(exported, GEMMA2, "portable", "Attention")
    assert [_attr(n, "softcap") for n in attention] == [cap] * 4
    _, tanh = _nodes(exported, GEMMA2, "decomposed", "Tanh")
    assert len(tanh) == 4 + 1  # one per layer and the final logits


def test_gemma2_logits_stay_under_the_final_softcap(exported, hf_folder):
    from edgekit.export import resolve
    from edgekit.runtimes.registry import open_engine

    folder = hf_folder(GEMMA2)
    config = resolve.load_config(folder)
    cap = config.final_logit_softcapping
    config.final_logit_softcapping = None
    prompt = np.random.default_rng(0).integers(1, config.vocab_size, size=40).tolist()
    with torch.no_grad():
        uncapped = resolve.load_model(folder, config)(torch.tensor([prompt])).logits
    session = open_engine(exported(GEMMA2, "ort"))
    session.reset(64)
    logits = session.forward(prompt)
    assert float(uncapped.abs().max()) > cap  # the head alone goes past the cap...
    assert np.abs(logits).max() < cap  # ...the graph's logits do not


def test_gemma3_local_and_global_layers_rotate_with_their_own_tables(exported):
    import transformers

    from edgekit.export.archs import families

    model, gqa = _nodes(exported, GEMMA3, "ort", "GroupQueryAttention")
    assert [list(n.input[7:9]) for n in gqa] == [["cos_local", "sin_local"]] * 3 + [["cos_global", "sin_global"]]
    tables = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if i.name[:4] in ("cos_", "sin_")}
    config = transformers.AutoConfig.for_model(**families()[GEMMA3].tiny_config())
    rotary = transformers.models.gemma3.modeling_gemma3.Gemma3RotaryEmbedding(config)
    positions = torch.arange(config.max_position_embeddings)[None]  # (1, max_pos)
    for layer_type, name in (("sliding_attention", "local"), ("full_attention", "global")):
        cos, sin = rotary(torch.zeros(1), positions, layer_type)  # (1, max_pos, D), halves repeated
        np.testing.assert_array_equal(tables[f"cos_{name}"], cos[0, :, : cos.shape[-1] // 2].numpy())
        np.testing.assert_array_equal(tables[f"sin_{name}"], sin[0, :, : sin.shape[-1] // 2].numpy())
    assert np.abs(tables["cos_local"] - tables["cos_global"]).max() > 0.1


def test_gemma3_noisy_norms_export_exactly(noisy_folder, tmp_path):
    """(1 + w) folded before tracing, q/k norms included, through ONNX Runtime."""
    from edgekit.export import export_model
    from edgekit.validate import validate

    folder = noisy_folder(GEMMA3)
    export_model(str(folder), tmp_path / "out", target="ort")
    report = validate(tmp_path / "out", str(folder), prompt_length=40, steps=8)
    assert report.greedy_match == report.greedy_total == 8
    assert report.max_abs_diff < 1e-3


def test_bidirectional_gemma_is_refused():
    import transformers

    from edgekit.errors import ConfigError
    from edgekit.export.archs import arch_for, families

    values = {**families()[GEMMA3].tiny_config(), "use_bidirectional_attention": True}
    config = transformers.AutoConfig.for_model(**values)
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        arch_for(config)
