"""The ONNX Runtime session: shared KV buffers, growth, and the concat cache."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.errors import ArtifactError
from edgekit.generate import generate
from edgekit.runtimes.registry import open_engine
from edgekit.types import TARGETS

PROMPT = [5, 17, 99, 3, 250, 7, 1000, 42]


def test_decode_writes_into_the_same_buffers(exported):
    """Shared past/present: the cache is never reallocated or copied during decode."""
    session = open_engine(exported("Qwen3ForCausalLM", "ort"))
    session.reset(64)
    pointers = [value.data_ptr() for value in session._past]
    session.forward(PROMPT)
    for token in (1, 2, 3):
        session.forward([token])
    assert [value.data_ptr() for value in session._past] == pointers
    keys = session._past[0].numpy()  # (1, KV, capacity, D)
    assert np.abs(keys[:, :, : session.length]).sum() > 0  # GQA wrote the rows in place
    assert session.length == len(PROMPT) + 3


def test_buffer_growth_keeps_the_cache(exported):
    path = exported("LlamaForCausalLM", "ort")
    roomy = open_engine(path)
    want = generate(roomy, PROMPT, 24).token_ids
    tight = open_engine(path)
    tight.reset(0)  # smallest buffer: generation must grow it past 64 positions
    tight._allocate(len(PROMPT) + 2)
    tight.forward(PROMPT)
    got = [int(tight.forward([want[0]])[-1].argmax())]
    for token in want[1:-1]:
        got.append(int(tight.forward([token])[-1].argmax()))
    assert tight._capacity >= len(PROMPT) + len(want) - 1
    assert got == want[1:]


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "MistralForCausalLM"])
def test_targets_generate_the_same_tokens(exported, architecture):
    tokens = {target: generate(open_engine(exported(architecture, target)), PROMPT, 32).token_ids for target in TARGETS}
    assert tokens["portable"] == tokens["ort"]
    assert tokens["decomposed"] == tokens["ort"]


def test_too_long_a_sequence_is_refused(exported):
    session = open_engine(exported("Qwen3ForCausalLM", "ort"))
    with pytest.raises(ArtifactError, match="exceeds the model's 1024 positions"):
        session.forward([1] * 1025)


def test_missing_export_folder_is_an_error(tmp_path):
    with pytest.raises(ArtifactError, match="does not exist"):
        open_engine(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no edgekit.json"):
        open_engine(tmp_path / "empty")
