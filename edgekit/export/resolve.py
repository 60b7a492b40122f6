"""Turn MODEL (a local folder, a preset name, or a hub id) into a local Hugging Face folder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError, ModelNotFoundError, did_you_mean
from edgekit.export.presets import PRESETS, materialize


def resolve_model(model: str) -> Path:
    """A local folder holding config.json and weights for ``model``."""
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelNotFoundError(f"model {model!r} is a file, not a folder", "pass a Hugging Face model folder")
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json", "pass a Hugging Face model folder (config.json + weights)"
            )
        return path
    if model in PRESETS:
        return materialize(model)
    if model.count("/") == 1 and not model.startswith((".", "/")):
        return _download(model)
    presets = ", ".join(PRESETS)
    raise ModelNotFoundError(
        f"model {model!r} is not a folder, a preset or a hub id.{did_you_mean(model, list(PRESETS))}",
        f"presets: {presets}; or pass a local Hugging Face folder",
    )


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo: all mean "not here"
        raise ModelNotFoundError(
            f"model {repo_id!r} is not a local folder and could not be downloaded ({type(exc).__name__})",
            "download it on a machine with network access and pass the folder, or use a preset",
        ) from None


def load_config(folder: Path) -> Any:
    """The transformers config of a model folder, with errors that name the file."""
    import transformers

    path = folder / "config.json"
    try:
        json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not readable JSON ({exc})", "fix or replace config.json") from None
    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as exc:
        raise ConfigError(f"{path} is not a valid transformers config ({exc})", "check model_type and the fields") from None


def load_generation_config(folder: Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} when absent)."""
    path = folder / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc})", "fix or delete generation_config.json") from None


TORCH_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def load_model(folder: Path, config: Any, dtype: str = "fp32", auto_class: str = "AutoModelForCausalLM") -> Any:
    """The Hugging Face model in eval mode, in ``dtype``, with eager attention."""
    import torch
    import transformers

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    try:
        model = getattr(transformers, auto_class).from_pretrained(
            folder, config=config, dtype=torch_dtype, attn_implementation="eager"
        )
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelNotFoundError(
            f"could not load the weights in {folder} ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})",
            "check that the folder holds complete *.safetensors (or pytorch_model.bin) weights",
        ) from None
    return model.eval()


def build_model(config: Any, dtype: str = "fp32", auto_class: str = "AutoModelForCausalLM") -> Any:
    """The Hugging Face model built from ``config`` alone (no weights read), in eval mode.

    Inside ``checkpoint.params_on_meta`` its parameters take no memory.
    """
    import torch
    import transformers

    torch_dtype = getattr(torch, TORCH_DTYPES[dtype])
    model = getattr(transformers, auto_class).from_config(config, dtype=torch_dtype, attn_implementation="eager")
    return model.eval()
