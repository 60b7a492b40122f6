"""Frozen artifacts that flow between stages; each one is a folder with a JSON sidecar.

``ExportedGraph`` is what ``export_model`` writes and what every runtime reads: it
is plain data (no torch), so the device side can load it.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgekit.errors import ArtifactError, ConfigError

SIDECAR = "edgekit.json"
SCHEMA_VERSION = 1

TARGETS = ("ort", "portable", "decomposed")
# Multi-token prediction (Qwen3.5/3.6, export --mtp): the head runs inside the target's graph, one more
# attention layer (its KV cache is the last of ``layers``) whose logits are this extra output, (batch, seq, vocab).
MTP_LOGITS = "mtp_logits"
# A draft model for speculative decoding travels inside a build: `build --draft DRAFT` copies it here.
DRAFT_FOLDER = "draft"
DTYPES = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, element type and symbolic shape."""

    name: str
    dtype: str  # numpy-style name: "int64", "float32", "float16", "bfloat16"
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class LayerSpec:
    """What a runtime must allocate for one decoder layer.

    Attention layers ("attention", "sliding_attention") carry a KV cache of
    (batch, num_kv_heads, sequence, head_dim). Linear-attention layers
    ("linear_attention", Gated DeltaNet) carry fixed-size states instead, named in
    ``states``: {"conv": [channels, kernel - 1], "recurrent": [heads, key_dim, value_dim]}
    (per sequence; the recurrent state is always float32).
    """

    index: int
    kind: str
    num_kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None  # tokens a query sees, itself included; None = global
    states: dict[str, list[int]] | None = None

    @property
    def has_kv(self) -> bool:
        return self.kind != "linear_attention"


@dataclass(frozen=True)
class StateIO:
    """One cache tensor of one layer: its graph input and output names."""

    past: str
    present: str
    layer: LayerSpec
    part: str  # "key" | "value" | "conv" | "recurrent"


def state_io(layers: tuple[LayerSpec, ...] | list[LayerSpec]) -> list[StateIO]:
    """Every cache tensor in graph order: per layer key, value (attention) or conv, recurrent."""
    names = []
    for layer in layers:
        if layer.has_kv:
            names += [StateIO(f"past_key_values.{layer.index}.{p}", f"present.{layer.index}.{p}", layer, p)
                      for p in ("key", "value")]
        else:
            names += [StateIO(f"past_{p}.{layer.index}", f"present_{p}.{layer.index}", layer, p)
                      for p in ("conv", "recurrent")]
    return names


@dataclass(frozen=True)
class ModelSpec:
    """The model an export came from, with every dimension read from its config."""

    source: str
    architecture: str
    model_type: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None


@dataclass(frozen=True)
class ExportedGraph:
    """An export folder: model.onnx (+ data), tokenizer files and the I/O contract."""

    path: Path
    model: ModelSpec
    target: str
    dtype: str
    opset: dict[str, int]
    custom_ops: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    layers: tuple[LayerSpec, ...]
    kv_cache: dict[str, Any]
    versions: dict[str, str]
    ops: tuple[str, ...] = ()  # every op type in the graph, "domain.Op" outside the default domain
    model_file: str = "model.onnx"
    tokenizer_files: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = None  # weights quantized at export (edgekit export --quant)
    weights: dict[str, Any] | None = None  # how the export wrote them: tensors, bytes, resumed_after
    kind: str = field(default="export")  # "build" when ``path`` is a build folder: see ``Engine``

    @property
    def model_path(self) -> Path:
        return self.path / self.model_file

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("path")
        return {"schema_version": SCHEMA_VERSION, **data}

    def save(self) -> None:
        """Write the sidecar into ``self.path``."""
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        (self.path / SIDECAR).write_text(text + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ExportedGraph":
        """Read an export folder, or a build folder (which embeds its export's contract)."""
        path = Path(path)
        data = read_sidecar(path)
        kind = data.get("kind")
        if kind == "build":  # the export's contract, with the engine's model file
            data = {**data.get("export", {}), "model_file": (data.get("build") or {}).get("model_file")}
        elif kind != "export":
            raise ArtifactError(
                f"{path} is a {data.get('kind')!r} folder, not an export or a build",
                "pass a folder written by `edgekit export` or `edgekit build`",
            )
        try:
            graph = cls._from_dict(path, data, kind)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{path / SIDECAR} is malformed ({type(exc).__name__}: {exc})",
                "re-export the model with `edgekit export ... --force`",
            ) from None
        if not graph.model_path.is_file():
            raise ArtifactError(
                f"{graph.model_path} is missing", "re-export the model with `edgekit export ... --force`"
            )
        return graph

    @classmethod
    def _from_dict(cls, path: Path, data: dict[str, Any], kind: str) -> "ExportedGraph":
        return cls(
            path=path,
            model=ModelSpec(**_tuples(data["model"], ("eos_token_ids",))),
            target=data["target"],
            dtype=data["dtype"],
            opset=data["opset"],
            custom_ops=tuple(data["custom_ops"]),
            inputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["inputs"]),
            outputs=tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in data["outputs"]),
            layers=tuple(LayerSpec(**layer) for layer in data["layers"]),
            kv_cache=data["kv_cache"],
            versions=data["versions"],
            ops=tuple(data["ops"]),
            model_file=data["model_file"],
            tokenizer_files=tuple(data["tokenizer_files"]),
            quantization=data.get("quantization"),
            weights=data.get("weights"),
            kind=kind,
        )


@dataclass(frozen=True)
class Engine:
    """What a runtime opens: a build folder (``edgekit build``), or an export run as it is on
    ONNX Runtime's CPU provider.

    ``graph`` is the export's I/O contract with this folder's model file; ``details`` is the whole
    ``build`` section of the sidecar as written, where each runtime keeps its own settings
    (``onnxruntime``: providers and options; ``tensorrt``: the plan file and ShapeProfile).
    """

    path: Path
    graph: ExportedGraph
    kind: str  # "build" | "export"
    runtime: str
    profile: str | None
    precision: str
    quantization: str
    requirements: dict[str, Any]
    source_export: dict[str, Any] | None = None
    quality: dict[str, Any] | None = None
    bench: dict[str, Any] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> "Engine":
        """Read a build folder, or an export folder (which runs as an ``ort-cpu`` engine)."""
        graph = ExportedGraph.load(path)
        if graph.kind == "export":
            quant = (graph.quantization or {}).get("quantization", "none")
            return cls(graph.path, graph, "export", EXPORT_RUNTIME, None, graph.dtype, quant, {"device": "cpu"})
        build = read_sidecar(graph.path).get("build")
        try:
            return cls(graph.path, graph, "build", build["runtime"], build["profile"], build["precision"],
                       build.get("quantization", "none"), build["requirements"], build.get("source_export"), build.get("quality"),
                       build.get("bench"), build)
        except (KeyError, TypeError) as exc:
            raise ArtifactError(
                f"{graph.path / SIDECAR} is a build this edgekit cannot read ({type(exc).__name__}: {exc})",
                f"rebuild it: edgekit build EXPORT_DIR --profile {(build or {}).get('profile', 'PROFILE')} "
                f"-o {graph.path} --force",
            ) from None

    @property
    def quantized(self) -> str | None:
        """'int4', 'int8' or 'fp8' when the export or this build quantized the weights, else None."""
        recorded = ((self.graph.quantization or {}).get("quantization"), self.quantization, self.precision)
        return next((q for q in recorded if q in ("int4", "int8", "fp8")), None)


EXPORT_RUNTIME = "ort-cpu"  # an export folder runs as it is on ONNX Runtime's CPU provider


def _tuples(data: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: (tuple(v) if k in keys else v) for k, v in data.items()}


def read_sidecar(path: Path) -> dict[str, Any]:
    """Load ``path/edgekit.json`` with errors that name the folder."""
    if not path.exists():
        raise ArtifactError(f"{path} does not exist", "pass a folder written by `edgekit export`")
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a folder", "pass a folder written by `edgekit export`")
    sidecar = path / SIDECAR
    if not sidecar.is_file():
        raise ArtifactError(f"{path} has no {SIDECAR}: it is not an edgekit export", _export_hint(path))
    try:
        data = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{sidecar} is not valid JSON ({exc})", "re-export with --force") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(
            f"{sidecar} has schema_version {data.get('schema_version') if isinstance(data, dict) else None!r}, "
            f"this edgekit reads {SCHEMA_VERSION}",
            "re-export with this edgekit version",
        )
    return data


def _export_hint(path: Path) -> str:
    """How to make an export from ``path``: never an output path equal to an input."""
    out = path.with_name(path.name + "-edgekit")
    if (path / "config.json").is_file():  # a Hugging Face folder: it is the MODEL, not the output
        return f"it looks like a Hugging Face model: export it first: edgekit export {path} -o {out}"
    return f"export a model first: edgekit export MODEL -o {out}, then pass {out}"


def check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Validate an enumerated option, naming the valid values."""
    if value not in choices:
        raise ConfigError(f"{name} {value!r} is not one of {', '.join(choices)}", f"use one of: {', '.join(choices)}")
    return value
