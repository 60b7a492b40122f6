"""Every family, every target: the exported graph matches PyTorch in fp32."""

from __future__ import annotations

import pytest

from edgekit.types import TARGETS
from tests.conftest import family_names


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("architecture", family_names())
def test_export_matches_pytorch(exported, hf_folder, architecture, target):
    from edgekit.validate import validate

    # 24 prompt tokens + 32 steps run past the 16-token window of the sliding-window families.
    report = validate(exported(architecture, target), str(hf_folder(architecture)), prompt_length=24, steps=32)
    assert report.greedy_match == report.greedy_total == 32
    assert report.max_abs_diff < 1e-3
    assert report.min_cosine_similarity > 0.99999
    assert report.passed


@pytest.mark.parametrize("target", ["ort", "decomposed"])
def test_fp16_export_runs_and_stays_close(exported, hf_folder, target):
    from edgekit.validate import validate

    report = validate(exported("Qwen3ForCausalLM", target, "fp16"), str(hf_folder("Qwen3ForCausalLM")), steps=16)
    assert report.dtype == "fp16"
    assert report.max_abs_diff < 0.1
    assert report.min_cosine_similarity > 0.999


def test_validate_fails_against_another_model(exported, hf_folder, tmp_path):
    """Same architecture and dimensions, other weights: validate must report a failure, not pass by
    construction (a reference of another architecture is refused before it runs)."""
    import shutil

    import torch
    import transformers

    from edgekit.validate import validate

    source = hf_folder("Qwen3ForCausalLM")
    other = tmp_path / "other-weights"
    shutil.copytree(source, other)
    torch.manual_seed(4321)
    config = transformers.AutoConfig.from_pretrained(source)
    transformers.Qwen3ForCausalLM(config).save_pretrained(other)
    report = validate(exported("Qwen3ForCausalLM", "ort"), str(other), steps=4)
    assert not report.passed
    assert report.max_abs_diff > 1e-2


def test_decomposed_attention_matches_the_kernel_off_the_families_paths():
    """Partial rotary (R < D), softcap, a window and GQA: paths no tiny family takes, checked op by op."""
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    import torch

    from edgekit.export.lower import lower
    from edgekit.export.ops import TRANSLATIONS

    heads, kv_heads, d, half = 4, 2, 16, 4  # rotary on 8 of 16 dims

    class OneAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            angles = torch.arange(64.0)[:, None] * torch.rand(half)  # (max_pos, R/2)
            self.register_buffer("cos", angles.cos())
            self.register_buffer("sin", angles.sin())

        def forward(self, q, k, v, past_key, past_value, mask):
            return torch.ops.edgekit.attention(
                q, k, v, past_key, past_value, mask, self.cos, self.sin, heads, kv_heads, 0.25, 4, 2.0, 0)

    torch.manual_seed(0)
    b, s, p = 2, 3, 5
    inputs = (torch.randn(b, s, heads * d), torch.randn(b, s, kv_heads * d), torch.randn(b, s, kv_heads * d),
              torch.randn(b, kv_heads, p, d), torch.randn(b, kv_heads, p, d), torch.ones(b, p + s, dtype=torch.int64))
    module = OneAttention().eval()
    program = torch.onnx.export(module, inputs, dynamo=True, custom_translation_table=TRANSLATIONS,
                                opset_version=23, verify=False, report=False, verbose=False)
    lower(program.model, "decomposed")
    assert not [n for n in program.model.graph if n.op_type in ("Attention", "RotaryEmbedding")]
    session = ort.InferenceSession(ir.to_proto(program.model).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    got = session.run(None, dict(zip(names, (x.numpy() for x in inputs))))
    want = module(*inputs)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w.numpy(), atol=1e-5, rtol=1e-5)
