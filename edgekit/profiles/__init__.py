"""Hardware profiles: one TOML file per target, validated field by field on load.

``load_profile("l4")`` reads a shipped profile; ``load_profile("path/to/board.toml")`` a user's.
Errors name the file and the field (``[hardware].memory_gb``) and say what is expected.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError, did_you_mean

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

PROFILE_DIR = Path(__file__).parent
DEVICES = ("cpu", "gpu", "jetson")
PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8", "int4")
QUANTIZATIONS = ("none", "int8", "int4")
PROVIDERS = ("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider")
HW_COMPAT = ("none", "ampere_plus", "same_compute_capability")


@dataclass(frozen=True)
class ShapeRange:
    """min / opt / max of one dimension (TensorRT's ShapeProfile takes these)."""

    min: int
    opt: int
    max: int


@dataclass(frozen=True)
class Profile:
    """A validated hardware profile."""

    name: str
    description: str
    device: str
    hardware: dict[str, Any]
    defaults: dict[str, Any]
    tensorrt: dict[str, Any] | None
    onnxruntime: dict[str, Any]
    shapes: dict[str, ShapeRange]
    path: Path

    @property
    def is_gpu(self) -> bool:
        return self.device in ("gpu", "jetson")

    def to_dict(self) -> dict[str, Any]:
        shapes = {k: [v.min, v.opt, v.max] for k, v in self.shapes.items()}
        data = {
            "name": self.name, "description": self.description, "device": self.device,
            "hardware": self.hardware, "defaults": self.defaults, "onnxruntime": self.onnxruntime,
            "shapes": shapes, "path": str(self.path),
        }
        if self.tensorrt is not None:
            data["tensorrt"] = self.tensorrt
        return data


def shipped_profiles() -> list[str]:
    """Names of the profiles that ship with edgekit."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml"))


def list_profiles() -> list[Profile]:
    """Every shipped profile, loaded (and so validated)."""
    return [load_profile(name) for name in shipped_profiles()]


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name, or a TOML file by path."""
    path = Path(name_or_path)
    if path.suffix != ".toml" or not path.exists():
        names = shipped_profiles()
        if str(name_or_path) not in names:
            raise ConfigError(
                f"profile {str(name_or_path)!r} is not a shipped profile or a .toml file.{did_you_mean(str(name_or_path), names)}",
                f"profiles: {', '.join(names)}; or pass --profile path/to/board.toml",
            )
        path = PROFILE_DIR / f"{name_or_path}.toml"
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"profile {path} is not readable TOML ({exc})", "fix the file's syntax") from None
    from edgekit.profiles._schema import parse

    return parse(data, path)
