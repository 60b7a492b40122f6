"""The streaming export: weights read tensor by tensor from safetensors give the same graph,
weights and logits as the model loaded in memory; an export killed midway resumes; quantizing
at export matches quantizing at build; memory stays below the model's size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edgekit.export import export_model
from edgekit.types import ExportedGraph

# Families whose weights go through something besides a plain copy: (1 + w) norms folded (Qwen3.5,
# Gemma 3), per-expert checkpoint tensors merged by transformers' converters (Qwen3-Next), tied
# embeddings (Llama's tiny config), the text model inside an image-text checkpoint (Qwen3.6-27B's layout).
FAMILIES = ["Qwen3_5ForCausalLM", "Qwen3_5ForConditionalGeneration", "Qwen3NextForCausalLM", "Gemma3ForCausalLM",
            "LlamaForCausalLM"]


def _initializers(folder: Path) -> dict[str, np.ndarray]:
    proto = onnx.load(str(folder / "model.onnx"))
    return {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}


def _logits(folder: Path, ids: list[int]) -> np.ndarray:
    from edgekit.runtimes.onnxruntime import OrtSession

    session = OrtSession(ExportedGraph.load(folder))
    session.reset()
    return session.forward(np.asarray(ids, dtype=np.int64))


@pytest.mark.parametrize("architecture", FAMILIES)
def test_streaming_equals_in_memory(architecture, hf_folder, tmp_path):
    source = str(hf_folder(architecture))
    streamed = export_model(source, tmp_path / "streamed")
    loaded = export_model(source, tmp_path / "loaded", in_memory=True)
    a, b = _initializers(streamed.path), _initializers(loaded.path)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    ids = list(range(5, 29))
    np.testing.assert_array_equal(_logits(streamed.path, ids), _logits(loaded.path, ids))


def test_bf16_checkpoint_to_fp32_export(hf_folder, tmp_path):
    """A bf16 checkpoint exported as fp32: cast first, then (1 + w), as from_pretrained + the wrapper do."""
    import torch
    import transformers

    folder = tmp_path / "bf16"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder("Qwen3_5ForCausalLM"), dtype=torch.bfloat16)
    model.save_pretrained(folder)
    for item in hf_folder("Qwen3_5ForCausalLM").glob("tokenizer*"):
        (folder / item.name).write_bytes(item.read_bytes())
    streamed = export_model(str(folder), tmp_path / "streamed")
    loaded = export_model(str(folder), tmp_path / "loaded", in_memory=True)
    for name, array in _initializers(streamed.path).items():
        np.testing.assert_array_equal(array, _initializers(loaded.path)[name], err_msg=name)
    assert streamed.dtype == "fp32"


def test_killed_export_resumes(hf_folder, tmp_path):
    source = str(hf_folder("Qwen3_5ForCausalLM"))
    out = tmp_path / "resumed"
    script = f"from edgekit.export import export_model; export_model({source!r}, {str(out)!r})"
    env = {**os.environ, "EDGEKIT_TEST_KILL_AFTER_TENSORS": "7"}
    killed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    partial = tmp_path / ".resumed.partial"
    assert not out.exists() and json.loads((partial / "weights.journal.json").read_text())["done"] == 7
    graph = export_model(source, out)  # same output: picks up the journal
    assert graph.weights["resumed_after"] == 7 and not partial.exists()
    clean = export_model(source, tmp_path / "clean")
    assert clean.weights["resumed_after"] == 0
    assert (out / "model.onnx.data").read_bytes() == (clean.path / "model.onnx.data").read_bytes()


def test_changed_settings_do_not_resume(hf_folder, tmp_path):
    """A journal from another export (here: another dtype) is not reused."""
    source = str(hf_folder("LlamaForCausalLM"))
    out = tmp_path / "out"
    script = f"from edgekit.export import export_model; export_model({source!r}, {str(out)!r}, dtype='fp16')"
    env = {**os.environ, "EDGEKIT_TEST_KILL_AFTER_TENSORS": "3"}
    assert subprocess.run([sys.executable, "-c", script], env=env, capture_output=True).returncode == -9
    graph = export_model(source, out, dtype="fp32")
    assert graph.weights["resumed_after"] == 0 and graph.dtype == "fp32"


def test_failed_export_leaves_nothing(tmp_path, hf_folder):
    folder = tmp_path / "broken"
    folder.mkdir()
    for item in hf_folder("LlamaForCausalLM").iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    tensors.pop("model.layers.0.mlp.up_proj.weight")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="model.layers.0.mlp.up_proj.weight"):
        export_model(str(folder), tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


# VmHWM is the peak RSS of this process's own memory map. getrusage's ru_maxrss is not: a child
# started by (v)fork + exec inherits the parent's high-water mark, so under a large pytest
# process it reports the parent's size, not the export's.
_PEAK = """
import sys
from edgekit.export import export_model
export_model(sys.argv[1], sys.argv[2], in_memory=sys.argv[3] == "1")
status = open("/proc/self/status").read()
print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
"""


def test_streaming_peak_memory_is_below_the_model(tmp_path):
    """Peak RSS of the export process: streaming stays well under loading, by most of the model's size.

    The model is large enough (0.54 GB) that run-to-run noise in tracing memory (~0.1 GB) cannot decide it.
    """
    import torch
    import transformers

    from edgekit.export.archs import families

    values = {**families()["Qwen3ForCausalLM"].tiny_config(), "vocab_size": 131072, "hidden_size": 512,
              "tie_word_embeddings": False}
    config = transformers.AutoConfig.for_model(**values)
    folder = tmp_path / "model"
    transformers.Qwen3ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    model_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    assert model_bytes > 500e6  # two 131072 x 512 fp32 tables and the layers

    def peak(in_memory: bool) -> int:
        out = tmp_path / f"out-{in_memory}"
        done = subprocess.run([sys.executable, "-c", _PEAK, str(folder), str(out), "1" if in_memory else "0"],
                              capture_output=True, text=True, check=True)
        return int(done.stdout.strip().splitlines()[-1])

    streamed, loaded = peak(False), peak(True)
    assert streamed < loaded - 0.5 * model_bytes, (streamed, loaded, model_bytes)
