"""Shared fixtures: tiny Hugging Face folders per family (random weights) and their exports.

Everything is built locally from each family's real transformers config; nothing comes
from a hub. Exports are cached per session because tracing takes seconds.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _edgekit_cache(tmp_path_factory):
    """Presets materialize into a per-session cache unless EDGEKIT_CACHE is set."""
    if "EDGEKIT_CACHE" not in os.environ:
        os.environ["EDGEKIT_CACHE"] = str(tmp_path_factory.mktemp("edgekit-cache"))


def family_names() -> list[str]:
    from edgekit.export.archs import families

    return sorted(families())


@pytest.fixture(scope="session")
def hf_folder(tmp_path_factory):
    """factory(architecture) -> a local HF folder with seeded random weights and the preset tokenizer."""
    import torch
    import transformers

    from edgekit.export.archs import families
    from edgekit.export.presets import TOKENIZER_DIR

    made: dict[str, Path] = {}

    def make(architecture: str) -> Path:
        if architecture not in made:
            folder = tmp_path_factory.mktemp(architecture)
            config = transformers.AutoConfig.for_model(**families()[architecture].tiny_config())
            torch.manual_seed(1234)
            getattr(transformers, architecture)(config).save_pretrained(folder)
            for item in TOKENIZER_DIR.iterdir():
                shutil.copy(item, folder / item.name)
            made[architecture] = folder
        return made[architecture]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, hf_folder):
    """factory(architecture, target, dtype) -> an export folder (cached for the session)."""
    from edgekit.export import export_model

    made: dict[tuple, Path] = {}

    def make(architecture: str, target: str = "ort", dtype: str = "fp32") -> Path:
        key = (architecture, target, dtype)
        if key not in made:
            out = tmp_path_factory.mktemp("exports") / f"{architecture}-{target}-{dtype}"
            export_model(str(hf_folder(architecture)), out, target=target, dtype=dtype)
            made[key] = out
        return made[key]

    return make
