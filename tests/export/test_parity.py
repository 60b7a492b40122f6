"""Every family, both targets: the exported graph matches PyTorch in fp32."""

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


def test_fp16_export_runs_and_stays_close(exported, hf_folder):
    from edgekit.validate import validate

    report = validate(exported("Qwen3ForCausalLM", "ort", "fp16"), str(hf_folder("Qwen3ForCausalLM")), steps=16)
    assert report.dtype == "fp16"
    assert report.max_abs_diff < 0.1
    assert report.min_cosine_similarity > 0.999


def test_validate_fails_against_another_model(exported, hf_folder):
    """Same vocabulary, different weights: validate must report a failure, not pass by construction."""
    from edgekit.validate import validate

    report = validate(exported("Qwen3ForCausalLM", "ort"), str(hf_folder("Qwen2ForCausalLM")), steps=4)
    assert not report.passed
    assert report.max_abs_diff > 1e-2
