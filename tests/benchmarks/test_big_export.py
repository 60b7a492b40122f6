"""benchmarks/big_export.py: the streamed random checkpoint, its shards, the disk check, the time -v parser."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "big_export.py"
SMALL = {"layers": 4, "hidden": 256, "intermediate": 512, "vocab": 4096}
CAP = 2_000_000  # bytes per shard: the small model (13 MB) spreads over several shards


def _load_script():
    spec = importlib.util.spec_from_file_location("big_export", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


big = _load_script()


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    """(folder, config) of the small-config checkpoint, written once for the module."""
    config = big.text_config(**SMALL)
    folder = tmp_path_factory.mktemp("big") / "ckpt"
    big.write_checkpoint(folder, config, seed=0, max_shard_bytes=CAP)
    return folder, config


def _shard_headers(folder: Path) -> dict[str, dict]:
    """file name -> its safetensors header, read by hand."""
    headers = {}
    for path in sorted(folder.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            headers[path.name] = json.loads(f.read(size))
    return headers


def test_full_config_is_qwen36_27b():
    config = big.text_config()
    assert config.model_type == "qwen3_5_text"
    assert config.layer_types.count("linear_attention") == 48 and config.layer_types.count("full_attention") == 16
    assert config.layer_types[3::4] == ["full_attention"] * 16
    specs = big.tensor_specs(config)
    params = sum(s.nbytes for s in specs) // 2
    assert 26.8e9 < params < 27.0e9  # 26.9 B without the MTP head
    shapes = {s.name: s.shape for s in specs}
    assert shapes["model.embed_tokens.weight"] == (248320, 5120)
    assert shapes["model.layers.3.self_attn.q_proj.weight"] == (2 * 24 * 256, 5120)  # query + output gate
    assert shapes["model.layers.3.self_attn.k_proj.weight"] == (4 * 256, 5120)
    assert shapes["model.layers.0.linear_attn.in_proj_qkv.weight"] == (2 * 16 * 128 + 48 * 128, 5120)
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (5120, 17408)


def test_checkpoint_loads_in_transformers(small_ckpt):
    import torch
    import transformers

    folder, config = small_ckpt
    model, info = transformers.Qwen3_5ForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    state = model.state_dict()
    specs = {s.name: s for s in big.tensor_specs(config)}
    assert set(state) == set(specs)
    for name, tensor in state.items():
        assert tensor.dtype == torch.bfloat16, name
        assert tuple(tensor.shape) == specs[name].shape, name
    assert torch.all(state["model.norm.weight"] == 0)  # applied as (1 + w)
    assert torch.all(state["model.layers.3.self_attn.q_norm.weight"] == 0)
    assert torch.all(state["model.layers.0.linear_attn.norm.weight"] == 1)  # the gated norm: plain w
    assert torch.all(state["model.layers.0.linear_attn.dt_bias"] == 1)
    a_log = state["model.layers.0.linear_attn.A_log"].float()
    assert a_log.min() >= math.log(0.01) - 0.05 and a_log.max() <= math.log(16) + 0.05 and a_log.std() > 0.3
    weight = state["model.layers.0.mlp.up_proj.weight"].float()
    assert abs(weight.std().item() - config.initializer_range) < 0.001 and abs(weight.mean().item()) < 0.001


def test_shards_respect_cap_and_index_maps_every_key(small_ckpt):
    folder, config = small_ckpt
    headers = _shard_headers(folder)
    assert len(headers) > 1
    names = [f"model-{i:05d}-of-{len(headers):05d}.safetensors" for i in range(1, len(headers) + 1)]
    assert sorted(headers) == names
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    where = {key: file for file, header in headers.items() for key in header if key != "__metadata__"}
    assert index["weight_map"] == where
    assert set(where) == {s.name for s in big.tensor_specs(config)}
    total = 0
    for file, header in headers.items():
        ends = [h["data_offsets"] for k, h in header.items() if k != "__metadata__"]
        data = max(end for _, end in ends)
        assert data <= CAP or len(ends) == 1, file
        header_bytes = 8 + len(json.dumps(header, separators=(",", ":")))
        assert (folder / file).stat().st_size == data + header_bytes + (-(header_bytes - 8) % 8)
        total += data
    assert index["metadata"]["total_size"] == total


def test_checkpoint_is_seeded(small_ckpt, tmp_path):
    folder, config = small_ckpt
    assert big.checkpoint_complete(folder, config, 0, CAP)
    assert not big.checkpoint_complete(folder, config, 1, CAP)
    again = tmp_path / "again"
    big.write_checkpoint(again, config, seed=0, max_shard_bytes=CAP)
    for path in folder.glob("*.safetensors"):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name


def test_plan_shards_gives_an_oversized_tensor_its_own_shard():
    specs = [big.TensorSpec("a", (10,), "normal"), big.TensorSpec("b", (100,), "normal"),
             big.TensorSpec("c", (10,), "normal"), big.TensorSpec("d", (10,), "normal")]
    shards = big.plan_shards(specs, max_bytes=50)
    assert [[s.name for s in shard] for shard in shards] == [["a"], ["b"], ["c", "d"]]


def test_bf16_bits_rounds_like_torch():
    import torch

    x = np.random.default_rng(0).standard_normal(10_000, dtype=np.float32) * 0.02
    x = np.concatenate([x, np.array([0.0, -0.0, 1.0, 1.00390625, 1.01171875, 65504.0, 1e-30], np.float32)])
    expected = torch.from_numpy(x.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    assert np.array_equal(big.bf16_bits(x.copy()), expected)


def test_disk_check_fails_with_one_clear_message(tmp_path):
    with pytest.raises(SystemExit) as failed:
        big.check_free_disk(tmp_path / "work", required=75 * 10**9, free=10 * 10**9)
    message = str(failed.value)
    assert message.startswith("error: not enough free disk under") and "need about 75.0 GB, 10.0 GB free" in message
    with pytest.raises(SystemExit):
        big.check_free_disk(tmp_path, required=10**18)  # more than any disk, against the real free space
    assert big.check_free_disk(tmp_path / "not" / "yet", required=1) > 1  # a folder still to be made


@pytest.mark.skipif(not Path("/usr/bin/time").exists(), reason="GNU time is not installed")
@pytest.mark.parametrize("program, status", [("true", 0), ("false", 1)])
def test_parse_time_v_on_a_real_run(tmp_path, program, status):
    report = tmp_path / "time.txt"
    subprocess.run(["/usr/bin/time", "-v", "-o", str(report), shutil.which(program)], check=False)
    measured = big.parse_time_v(report.read_text())
    assert measured["exit_status"] == status
    assert 0 < measured["peak_rss_bytes"] < 10**9 and 0 <= measured["wall_s"] < 10


def test_parse_time_v_rejects_other_text():
    with pytest.raises(ValueError, match="not a /usr/bin/time -v report"):
        big.parse_time_v("real 0m0.001s")
