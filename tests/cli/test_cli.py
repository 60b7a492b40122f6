"""The edgekit command as a user meets it: help, errors with hints, JSON, no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def edgekit(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from edgekit.cli import main; main()", *args],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600,
    )


def test_help_works_without_torch_or_transformers():
    # A None entry in sys.modules makes `import torch` raise ImportError.
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "sys.argv = ['edgekit', '--help']\n"
        "from edgekit.cli import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    assert e.code in (0, None), e.code\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for command in ("export", "run", "validate"):
        assert command in result.stdout


def test_version():
    from edgekit import __version__

    result = edgekit("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"edgekit {__version__}"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    result = edgekit("export", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "error:" in result.stderr and "GPT2LMHeadModel is not supported" in result.stderr
    assert "LlamaForCausalLM" in result.stderr and "Qwen3ForCausalLM" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_unknown_model_suggests_a_preset(tmp_path):
    result = edgekit("export", "tiny-qwen", "-o", str(tmp_path / "out"))
    assert result.returncode == 1
    assert "'tiny-qwen'" in result.stderr and "Did you mean 'tiny-qwen3'" in result.stderr
    assert "hint:" in result.stderr


def test_config_missing_a_field_is_named(tmp_path, hf_folder):
    folder = tmp_path / "broken"
    folder.mkdir()
    config = json.loads((hf_folder("LlamaForCausalLM") / "config.json").read_text())
    del config["hidden_size"]
    (folder / "config.json").write_text(json.dumps(config))
    result = edgekit("export", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "has no 'hidden_size'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_corrupt_config_and_missing_weights(tmp_path, hf_folder):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    result = edgekit("export", str(folder), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "config.json is not readable JSON" in result.stderr
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text((hf_folder("Qwen2ForCausalLM") / "config.json").read_text())
    result = edgekit("export", str(weightless), "-o", str(tmp_path / "out"))
    assert result.returncode == 1 and "could not load the weights" in result.stderr
    assert not (tmp_path / "out").exists()


def test_existing_output_needs_force(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = edgekit("export", "tiny-qwen3", "-o", str(out))
    assert result.returncode == 1 and "already exists" in result.stderr and "--force" in result.stderr
    assert (out / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing(tmp_path, hf_folder, monkeypatch):
    import edgekit.export as export

    def broken_save(model, path, identity, progress):
        path.write_bytes(b"half a model")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_save", broken_save)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        export.export_model(str(hf_folder("Qwen3ForCausalLM")), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left either


def test_run_json_and_streaming(exported):
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("run", str(path), "--prompt", "def main():", "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert len(data["token_ids"]) == 8 and isinstance(data["text"], str)
    assert data["ttft_ms"] > 0 and data["decode_tokens_per_s"] > 0
    assert data["runtime"].startswith("onnxruntime ") and data["runtime"].endswith(" CPUExecutionProvider")
    streamed = edgekit("run", str(path), "--prompt", "def main():", "--max-new-tokens", "8")
    assert streamed.returncode == 0
    assert streamed.stdout.strip() == data["text"].strip()


def test_run_is_greedy_and_reproducible_by_default(exported):
    path = exported("LlamaForCausalLM", "ort")
    first = json.loads(edgekit("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json").stdout)
    second = json.loads(edgekit("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json").stdout)
    assert first["token_ids"] == second["token_ids"]
    sampled = [
        json.loads(edgekit("run", str(path), "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json",
                           "--temperature", "5", "--seed", str(seed)).stdout)["token_ids"]
        for seed in (1, 2)
    ]
    assert sampled[0] != sampled[1]


def test_run_bad_inputs(exported, tmp_path):
    path = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("run", str(path), "--prompt-ids", "1,x")
    assert result.returncode == 1 and "--prompt-ids '1,x'" in result.stderr
    result = edgekit("run", str(path))
    assert result.returncode == 1 and "exactly one of --prompt and --prompt-ids" in result.stderr
    result = edgekit("run", str(tmp_path / "missing"), "--prompt", "x")
    assert result.returncode == 1 and "does not exist" in result.stderr


def test_validate_json_and_exit_code(exported, hf_folder):
    path = exported("Qwen2ForCausalLM", "portable")
    ok = edgekit("validate", str(path), "--reference", str(hf_folder("Qwen2ForCausalLM")), "--steps", "8", "--json")
    assert ok.returncode == 0, ok.stderr
    report = json.loads(ok.stdout)
    assert report["passed"] is True and report["greedy_match"] == report["greedy_total"] == 8
    assert report["max_abs_diff"] < 1e-3
    bad = edgekit("validate", str(path), "--reference", str(hf_folder("LlamaForCausalLM")), "--steps", "4", "--json")
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["passed"] is False


def test_quickstart_names_the_default_preset():
    from edgekit.export.presets import DEFAULT_PRESET

    script = (ROOT / "scripts" / "quickstart.sh").read_text()
    assert f"MODEL=${{1:-{DEFAULT_PRESET}}}" in script
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/quickstart.sh" in readme and "bash scripts/test.sh" in readme
