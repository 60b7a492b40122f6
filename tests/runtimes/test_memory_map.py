"""Weights that do not fit in memory stay memory-mapped: ONNX Runtime's prepacking (a private copy
of every MatMul weight) is turned off, so the weights are file pages the kernel can evict."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

_RUN = """
import json, sys
import numpy as np
from edgekit.runtimes.registry import open_engine

def anon():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("RssAnon"))

before = anon()
session = open_engine(sys.argv[1], threads=1, memory_map=sys.argv[2] == "1")
logits = session.forward(np.arange(3, 19))
print(json.dumps({"anon": anon() - before, "mapped": session.memory_mapped, "logits": logits[-1].tolist()}))
"""


@pytest.fixture(scope="module")
def large_export(tmp_path_factory):
    """A Qwen3-family export with about 140 MB of fp32 weights, mostly two 32768 x 512 tables."""
    import transformers

    from edgekit.export import export_model
    from edgekit.export.archs import families

    values = {**families()["Qwen3ForCausalLM"].tiny_config(), "vocab_size": 32768, "hidden_size": 512,
              "tie_word_embeddings": False}
    folder = tmp_path_factory.mktemp("large") / "model"
    transformers.Qwen3ForCausalLM(transformers.AutoConfig.for_model(**values)).save_pretrained(folder)
    return export_model(str(folder), folder.parent / "export")


def _run(path, memory_map: bool) -> dict:
    done = subprocess.run([sys.executable, "-c", _RUN, str(path), "1" if memory_map else "0"],
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_memory_mapped_weights_are_not_copied(large_export):
    from edgekit.quantize import model_bytes

    weights = model_bytes(large_export.model_path)
    packed, mapped = _run(large_export.path, False), _run(large_export.path, True)
    assert mapped["mapped"] and not packed["mapped"]
    assert packed["anon"] > 0.5 * weights, packed["anon"]  # prepacked: a private copy of the weights
    assert mapped["anon"] < 0.3 * weights, mapped["anon"]  # mapped: file pages, not anonymous memory
    np.testing.assert_allclose(mapped["logits"], packed["logits"], atol=1e-4)


def test_auto_maps_only_what_does_not_fit(large_export):
    from edgekit.runtimes.onnxruntime import weights_fit

    assert weights_fit(large_export.model_path)  # 140 MB fits this machine
    assert not weights_fit(large_export.model_path, available=10 << 20)
