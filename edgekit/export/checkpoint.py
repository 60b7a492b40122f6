"""Model weights read tensor by tensor, never the whole model at once.

A model for tracing is built with its parameters on the meta device (``params_on_meta``:
buffers such as rotary ``inv_freq`` stay real, they are computed from the config), and
each parameter is later read on demand from a ``WeightSource``:

- ``Checkpoint``: the safetensors files of a Hugging Face folder, memory-mapped. Checkpoint
  keys map to model parameters with transformers' own conversion rules (renamings, and
  converters such as per-expert tensors merged into one MoE parameter), so a parameter
  reads exactly what ``from_pretrained`` would have put there.
- ``StateDict``: the tensors of a model already in memory (checkpoints without safetensors,
  and the reference the tests compare the streaming path against).
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from typing import Any, Iterator

from edgekit.errors import EdgekitError


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device (no memory), buffers stay real."""
    from torch import nn

    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class StateDict:
    """Parameters of a model already loaded in memory, by model parameter name."""

    def __init__(self, model: Any):
        self.tensors = dict(model.state_dict(keep_vars=True))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def load(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        tensor = self.tensors[name].detach()
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def describe(self) -> list[Any]:
        return ["state_dict"]


class Checkpoint:
    """The safetensors files of ``folder``, read per parameter of ``model`` (built on meta).

    ``load(name, rows)`` returns the parameter (or rows ``[start, stop)`` of it) as a CPU torch
    tensor in the checkpoint's dtype; only those bytes are read.
    """

    def __init__(self, folder: Path, model: Any):
        self.folder = folder
        self.files = sorted(folder.glob("*.safetensors"))
        self.tensors = {key: (path, info) for path in self.files for key, info in _header(path).items()}
        self.model = model
        self.plan = self._plan(model)

    @staticmethod
    def available(folder: Path) -> bool:
        return any(folder.glob("*.safetensors"))

    def __contains__(self, name: str) -> bool:
        return name in self.plan

    def describe(self) -> list[Any]:
        """What identifies these weights (files, sizes, times): a resumed export checks it."""
        return [[p.name, p.stat().st_size, int(p.stat().st_mtime)] for p in self.files]

    def _plan(self, model: Any) -> dict[str, tuple[Any, list[tuple[str, str]]]]:
        """Model parameter -> (converter or None, [(checkpoint key, converter source pattern)])."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

        mapping = get_model_conversion_mapping(model)
        renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        converters = [m for m in mapping if isinstance(m, WeightConverter)]
        by_pattern = {p: c for c in converters for p in c.source_patterns}
        meta = model.state_dict()
        plan: dict[str, tuple[Any, list[tuple[str, str]]]] = {}
        for key in sorted(self.tensors, key=dot_natural_key):  # the loader's order: experts 0, 1, ..., 10
            target, pattern = rename_source_key(key, renamings, converters, model.base_model_prefix, meta)
            if target not in meta and key in meta:
                target, pattern = key, None
            if target not in meta:
                continue  # e.g. a vision tower the export leaves behind
            converter = copy.deepcopy(by_pattern[pattern]) if pattern is not None else None
            plan.setdefault(target, (converter, []))[1].append((key, pattern))
        return plan

    def load(self, name: str, rows: tuple[int, int] | None = None) -> Any:
        converter, sources = self.plan[name]
        if converter is None:
            return self._read(sources[0][0], rows)
        tensor = self._convert(name, converter, sources)
        return tensor if rows is None else tensor[rows[0]:rows[1]]

    def _read(self, key: str, rows: tuple[int, int] | None = None) -> Any:
        """Rows [start, stop) of a tensor (all without ``rows``), read into fresh memory.

        Read, not memory-mapped: mapped pages count in the process's resident size until the
        kernel evicts them, so mapping a 55 GB checkpoint would look like 20 GB of RSS.
        """
        import torch

        path, info = self.tensors[key]
        shape = list(info["shape"])
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        start, stop = info["data_offsets"]
        row = (stop - start) // shape[0] if shape and shape[0] else 0
        if rows is not None:
            start, stop = start + rows[0] * row, start + rows[1] * row
            shape[0] = rows[1] - rows[0]
        buffer = bytearray(stop - start)
        with open(path, "rb") as f:
            f.seek(info["base"] + start)
            f.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if buffer else torch.empty(shape, dtype=dtype)

    def _convert(self, name: str, converter: Any, sources: list[tuple[str, str]]) -> Any:
        """What transformers' WeightConverter.convert computes for ``name`` (e.g. experts stacked)."""
        collected: dict[str, list[Any]] = {}
        for key, pattern in sources:
            collected.setdefault(pattern, []).append(self._read(key))
        for op in converter.operations:
            collected = op.convert(collected, source_patterns=converter.source_patterns,
                                   target_patterns=converter.target_patterns, full_layer_name=name,
                                   model=self.model, config=self.model.config, missing_keys=None)
        if len(collected) != 1:
            raise EdgekitError(f"cannot stream {name}: its checkpoint conversion yields {len(collected)} tensors",
                               "export with the model in memory (edgekit export --in-memory)")
        return next(iter(collected.values()))



SAFETENSORS_DTYPES: dict[str, Any] = {}


def _header(path: Path) -> dict[str, dict[str, Any]]:
    """A safetensors file's tensors: dtype, shape, data_offsets, and ``base`` (where data starts)."""
    import struct

    import torch

    if not SAFETENSORS_DTYPES:
        SAFETENSORS_DTYPES.update({"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                                   "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                                   "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool})
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise EdgekitError(f"{path} is not a readable safetensors file ({exc})",
                           "re-download or re-save the checkpoint") from None
    header.pop("__metadata__", None)
    for key, info in header.items():
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise EdgekitError(f"{path}: tensor {key} has dtype {info['dtype']}, which edgekit cannot read",
                               "convert the checkpoint to bf16/fp16/fp32 first")
        info["base"] = 8 + length
    return header


def attach(model: Any, wrapper: Any, hf_model: Any, source: Any) -> int:
    """Give every parameter initializer of the traced ``model`` a lazy recipe reading ``source``.

    Initializers are named by the wrapper's parameter paths; each maps to the Hugging Face
    parameter it is (by identity, which also resolves tied weights) and to the transforms
    the wrapper recorded with ``derive`` (e.g. a (1 + w) norm folded). Buffers (rotary
    tables) keep their computed values. Returns the number of weights attached.
    """
    from edgekit.export.lazy import make

    hf_names: dict[int, list[str]] = {}
    for name, param in hf_model.named_parameters(remove_duplicate=False):
        hf_names.setdefault(id(param), []).append(name)
    params = dict(wrapper.named_parameters(remove_duplicate=False))
    attached = 0
    for name, value in list(model.graph.initializers.items()):
        param = params.get(name)
        if param is None:
            continue
        # The Hugging Face model holds the derived parameter under the original name.
        names = [n for n in hf_names.get(id(param), []) if n in source]
        fns = []
        while id(param) in wrapper.derived:
            param, fn = wrapper.derived[id(param)]
            fns.append(fn)
        if not names:
            wanted = hf_names.get(id(param), [name])[0]
            raise EdgekitError(f"the checkpoint has no tensor for {wanted}",
                               "check that the folder's *.safetensors are complete")
        dtype = value.const_value.dtype
        load = _loader(source, names[0], tuple(reversed(fns)), param.dtype)
        value.const_value = make(load, dtype, tuple(param.shape), name)
        attached += 1
    return attached


def _loader(source: Any, name: str, fns: tuple, dtype: Any):
    def load(rows: tuple[int, int] | None = None):
        import torch

        with torch.no_grad():
            # Cast first, as from_pretrained does before prepare() runs: (1 + w) in fp32, not in bf16.
            tensor = source.load(name, rows).to(dtype)
            for fn in fns:  # derive() transforms are elementwise: rows commute with them
                tensor = fn(tensor)
            return to_numpy(tensor)

    return load


def to_numpy(tensor: Any):
    """A CPU torch tensor as numpy; bfloat16 as ml_dtypes.bfloat16 (what onnx_ir uses)."""
    import torch

    tensor = tensor.detach().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()
