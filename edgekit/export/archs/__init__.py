"""Model families, registered under their Hugging Face architecture names.

Adding a family is one file here: a :class:`DecoderArch` subclass decorated with
``@register``. Tests pick up every registered family's ``tiny_config()``.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

from edgekit.errors import UnsupportedArchitectureError
from edgekit.export.archs.base import DecoderArch

REGISTRY: dict[str, type[DecoderArch]] = {}


def register(cls: type[DecoderArch]) -> type[DecoderArch]:
    """Class decorator: make ``cls`` the exporter for each of its architecture names."""
    for name in cls.architectures:
        REGISTRY[name] = cls
    return cls


def _load_all() -> None:
    for info in pkgutil.iter_modules(__path__):
        if info.name != "base":
            importlib.import_module(f"{__name__}.{info.name}")


def families() -> dict[str, type[DecoderArch]]:
    """Every registered family, keyed by its first architecture name."""
    _load_all()
    return {cls.architectures[0]: cls for cls in dict.fromkeys(REGISTRY.values())}


def arch_for(config: Any, config_path: Any = None) -> DecoderArch:
    """The family that exports ``config``, or an error listing the supported ones."""
    _load_all()
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        if name in REGISTRY:
            return REGISTRY[name](config, config_path)
    supported = ", ".join(sorted(REGISTRY))
    found = ", ".join(names) or f"model_type {getattr(config, 'model_type', '?')!r} with no 'architectures'"
    raise UnsupportedArchitectureError(
        f"{config_path or 'the model'}: architecture {found} is not supported",
        f"supported architectures: {supported}",
    )
