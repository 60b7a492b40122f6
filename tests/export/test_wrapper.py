"""The traced module and its reference kernels agree with Hugging Face eagerly."""

from __future__ import annotations

import torch
import transformers


def _wrapper_and_model(folder):
    from edgekit.export import resolve
    from edgekit.export.archs import arch_for
    from edgekit.export.wrapper import DecoderForExport

    config = resolve.load_config(folder)
    arch = arch_for(config, folder / "config.json")
    model = resolve.load_model(folder, config)
    return DecoderForExport(model, arch).eval(), model, arch


def _empty_past(arch, batch=1):
    cfg = arch.config
    return [torch.zeros(batch, cfg.num_key_value_heads, 0, arch.head_dim) for _ in range(2 * cfg.num_hidden_layers)]


def test_wrapper_matches_hf_logits(hf_folder):
    wrapper, model, arch = _wrapper_and_model(hf_folder("Qwen3ForCausalLM"))
    ids = torch.randint(1, 2048, (1, 20))
    with torch.no_grad():
        got = wrapper(ids, torch.ones_like(ids), *_empty_past(arch))[0]
        want = model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_sliding_window_changes_the_result(hf_folder):
    """Guards the parity tests: with the window ignored, long prompts must differ from Mistral's."""
    wrapper, model, arch = _wrapper_and_model(hf_folder("MistralForCausalLM"))
    ids = torch.randint(1, 2048, (1, 40))
    with torch.no_grad():
        want = model(ids).logits
        windowed = wrapper(ids, torch.ones_like(ids), *_empty_past(arch))[0]
        wrapper.windows = [0] * len(wrapper.windows)
        unwindowed = wrapper(ids, torch.ones_like(ids), *_empty_past(arch))[0]
    assert torch.allclose(windowed, want, atol=1e-5)
    assert (unwindowed - want).abs().max() > 1e-3


def test_llama3_rope_scaling_is_in_the_tables(hf_folder):
    from edgekit.export.wrapper import rotary_tables

    wrapper, model, arch = _wrapper_and_model(hf_folder("LlamaForCausalLM"))
    max_pos = arch.config.max_position_embeddings
    cos, _ = rotary_tables(model.model.rotary_emb, max_pos, torch.float32)
    plain = transformers.LlamaConfig(**{**arch.config.to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}})
    plain_model = transformers.LlamaForCausalLM(plain)
    plain_cos, _ = rotary_tables(plain_model.model.rotary_emb, max_pos, torch.float32)
    assert cos.shape == (arch.config.max_position_embeddings, arch.head_dim // 2)
    assert (cos - plain_cos).abs().max() > 1e-3  # llama3 scaling changed the low frequencies
