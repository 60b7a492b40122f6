"""Field-by-field validation of a profile's TOML data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgekit.errors import ConfigError, did_you_mean
from edgekit.profiles import (
    DEVICES, HW_COMPAT, PRECISIONS, PROVIDERS, QUANTIZATIONS, Profile, ShapeRange,
)

SECTIONS = {"name", "description", "device", "hardware", "defaults", "tensorrt", "onnxruntime", "shapes"}
FIELDS = {
    "hardware": {"compute_capability", "cpu_flags", "memory_gb", "memory_bandwidth_gbs", "precisions", "dla_cores"},
    "defaults": {"precision", "quantization", "runtimes", "quant_block_size", "quant_accuracy_level"},
    "tensorrt": {"workspace_mb", "builder_optimization_level", "hardware_compatibility", "version_compatible",
                 "min_version", "dla_core"},
    "onnxruntime": {"execution_provider", "intra_op_threads", "provider_options"},
    "shapes": {"batch", "prompt", "context"},
}


def _field(section: str, key: str) -> str:
    return f"[{section}].{key}" if section else key


class _Checker:
    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, expected: str, got: Any = None) -> None:
        shown = "" if got is None else f", got {got!r}"
        raise ConfigError(f"profile {self.path}: {field} must be {expected}{shown}", f"fix {field} in {self.path.name}")

    def table(self, data: dict, section: str, required: bool = True) -> dict | None:
        value = data.get(section)
        if value is None:
            if required:
                self.fail(f"[{section}]", "present")
            return None
        if not isinstance(value, dict):
            self.fail(f"[{section}]", "a table", value)
        for key in value:
            if key not in FIELDS[section]:
                self.fail(f"[{section}].{key}", f"one of {sorted(FIELDS[section])}{did_you_mean(key, sorted(FIELDS[section]))}", key)
        return value

    def number(self, table: dict, section: str, key: str, kind=float, low=None, high=None, required=True):
        value = table.get(key)
        field = _field(section, key)
        if value is None:
            if required:
                self.fail(field, "present")
            return None
        ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
        if not ok or (low is not None and value < low) or (high is not None and value > high):
            bounds = f" in [{low}, {high if high is not None else '∞'}]" if low is not None else ""
            self.fail(field, f"a{'n integer' if kind is int else ' number'}{bounds}", value)
        return value

    def choice(self, table: dict, section: str, key: str, choices, required=True):
        value = table.get(key)
        if value is None and not required:
            return None
        if value not in choices:
            self.fail(_field(section, key), f"one of {', '.join(choices)}", value)
        return value

    def names(self, table: dict, section: str, key: str):
        value = table.get(key)
        if not isinstance(value, list) or not value or any(not isinstance(v, str) or not v for v in value):
            self.fail(f"[{section}].{key}", "a non-empty list of runtime names (edgekit build --help)", value)
        return value

    def choices(self, table: dict, section: str, key: str, choices):
        value = table.get(key)
        if not isinstance(value, list) or not value or any(v not in choices for v in value):
            self.fail(f"[{section}].{key}", f"a non-empty list drawn from {', '.join(choices)}", value)
        return value

    def shape(self, table: dict, key: str) -> ShapeRange:
        value = table.get(key)
        if (not isinstance(value, list) or len(value) != 3 or any(not isinstance(v, int) or isinstance(v, bool) for v in value)
                or not 1 <= value[0] <= value[1] <= value[2]):
            self.fail(f"[shapes].{key}", "[min, opt, max] integers with 1 <= min <= opt <= max", value)
        return ShapeRange(*value)


def parse(data: dict, path: Path) -> Profile:
    """Validate ``data`` (parsed TOML) into a Profile, naming the first bad field."""
    c = _Checker(path)
    for key in data:
        if key not in SECTIONS:
            c.fail(key, f"one of {sorted(SECTIONS)}{did_you_mean(key, sorted(SECTIONS))}", key)
    if not isinstance(data.get("name"), str) or not data["name"]:
        c.fail("name", "a non-empty string", data.get("name"))
    device = c.choice(data, "", "device", DEVICES)
    hardware = _hardware(c, c.table(data, "hardware"), device)
    defaults = c.table(data, "defaults")
    c.choice(defaults, "defaults", "precision", hardware["precisions"])
    c.choice(defaults, "defaults", "quantization", QUANTIZATIONS)
    # Names the runtime registry knows; checked when a build resolves them (profiles import no runtime).
    c.names(defaults, "defaults", "runtimes")
    block = c.number(defaults, "defaults", "quant_block_size", int, 16, 256, required=False)
    if block is not None and block & (block - 1):
        c.fail("[defaults].quant_block_size", "a power of two in [16, 256]", block)
    c.number(defaults, "defaults", "quant_accuracy_level", int, 0, 4, required=False)
    tensorrt = c.table(data, "tensorrt", required=device != "cpu")
    if tensorrt is not None:
        _tensorrt(c, tensorrt, hardware)
    ort = c.table(data, "onnxruntime")
    c.choice(ort, "onnxruntime", "execution_provider", PROVIDERS)
    c.number(ort, "onnxruntime", "intra_op_threads", int, 0)
    if not isinstance(ort.get("provider_options", {}), dict):
        c.fail("[onnxruntime].provider_options", "a table", ort.get("provider_options"))
    shapes = {k: c.shape(c.table(data, "shapes"), k) for k in ("batch", "prompt", "context")}
    if shapes["prompt"].max > shapes["context"].max:
        c.fail("[shapes].prompt", f"at most [shapes].context's max ({shapes['context'].max})", shapes["prompt"].max)
    return Profile(
        name=data["name"], description=str(data.get("description", "")), device=device, hardware=hardware,
        defaults=defaults, tensorrt=tensorrt, onnxruntime=ort, shapes=shapes, path=path,
    )


def _hardware(c: _Checker, hw: dict, device: str) -> dict:
    c.number(hw, "hardware", "memory_gb", float, 0.1)
    c.number(hw, "hardware", "memory_bandwidth_gbs", float, 0.1)
    c.choices(hw, "hardware", "precisions", PRECISIONS)
    c.number(hw, "hardware", "dla_cores", int, 0, 8, required=False)
    if device == "cpu":
        flags = hw.get("cpu_flags")
        if not isinstance(flags, list) or not all(isinstance(f, str) and f for f in flags):
            c.fail("[hardware].cpu_flags", "a list of CPU flag names (as /proc/cpuinfo spells them)", flags)
    else:
        cc = hw.get("compute_capability")
        parts = cc.split(".") if isinstance(cc, str) else []
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            c.fail("[hardware].compute_capability", 'a "major.minor" string such as "8.7"', cc)
        if "fp8" in hw["precisions"] and tuple(map(int, parts)) < (8, 9):
            c.fail("[hardware].precisions", f"free of fp8 on compute capability {cc} (FP8 needs 8.9+)", hw["precisions"])
    return hw


def _tensorrt(c: _Checker, trt: dict, hardware: dict) -> None:
    c.number(trt, "tensorrt", "workspace_mb", int, 1)
    c.number(trt, "tensorrt", "builder_optimization_level", int, 0, 5)
    c.choice(trt, "tensorrt", "hardware_compatibility", HW_COMPAT)
    if not isinstance(trt.get("version_compatible"), bool):
        c.fail("[tensorrt].version_compatible", "true or false", trt.get("version_compatible"))
    version = trt.get("min_version")
    if not isinstance(version, str) or not all(p.isdigit() for p in version.split(".")):
        c.fail("[tensorrt].min_version", 'a version string such as "10.3"', version)
    dla = c.number(trt, "tensorrt", "dla_core", int, -1, required=False)
    if dla is not None and dla >= hardware.get("dla_cores", 0):
        c.fail("[tensorrt].dla_core", f"-1 or below [hardware].dla_cores ({hardware.get('dla_cores', 0)})", dla)
