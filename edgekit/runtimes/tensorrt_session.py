"""Native TensorRT session: step a plan built by ``edgekit.runtimes.tensorrt.build`` on the GPU.

    model.plan ─deserialize (+ refit a weight-stripped plan from the export's ONNX)→ ICudaEngine
        ─one IExecutionContext, one CUDA stream, buffers for the max context→ PlanSession

One step, batch 1 (``portable`` / ``decomposed`` graphs concatenate past + new into present)::

    host ids (1, S) int64 ──H2D──▶ ids buffer (1, S_max)
    mask buffer (1, C_max) int64: ones, written once; a step binds its first past + S entries
    state i: buffer[i][p] ─past (1, KV, past, D)─▶ engine ─present (1, KV, past+S, D)─▶ buffer[i][1-p]
    logits buffer (1, S_max, vocab) ──D2H──▶ host: the last row (last_logits) or every row (forward)
    mtp_logits buffer (export --mtp), the same shape ──D2H──▶ host when the MTP proposer reads it

Why it is built this way:

- Ping-pong: TensorRT 10.3 (JetPack 6) has no in-place KV-cache update and an engine input may
  not alias an output, so every state (key, value, conv, recurrent) has two buffers sized for the
  ShapeProfile's max context that swap roles after each step: no allocation and no copy per step,
  at twice the cache memory (``BufferPlan.state_bytes``). Future work: TensorRT >= 10.15 parses
  ONNX ``Attention`` with a KV-cache update that writes the new rows into a (1, KV, C_max, D)
  cache in place (aliased I/O); that needs an export target emitting it, and halves the cache.
- No CUDA graphs: a captured graph freezes every kernel's launch configuration (grid sizes, the
  tactic TensorRT picked for those shapes) and every pointer. A decode step with a growing past
  changes the shape of each past and present tensor every step (past = n, n + 1, ...), so a graph
  captured at one step is invalid at the next. Padding the past to fixed buckets is not sound with
  these graphs either: present = concat(past, new) puts the new rows after the padding, leaving
  holes in the middle of the next step's past. A fixed-shape cache (the in-place update above, with
  the write position as an input) would make one graph per parity sound: future work with it.
- Per step only the token ids cross PCIe inward (the mask is all ones and stays on the device), and
  only the logits rows asked for come back.
- Everything but :class:`TrtExecutor` is vendor-free: the tests drive :class:`PlanSession` with
  an executor that runs the same ONNX graph on ONNX Runtime CPU, NumPy arrays standing in for
  device buffers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edgekit.errors import ArtifactError, InternalError, MissingDependencyError
from edgekit.runtimes.cuda_stream import CudaStream, TensorrtRunError
from edgekit.types import MTP_LOGITS, ExportedGraph, state_io

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1}
STATE_ROLES = ("key", "value", "conv", "recurrent")
LOGITS_BUDGET = 256 << 20  # bytes of logits one step may return (bounds the prefill chunk)
# TensorRT's DataType names -> the numpy-style names of TensorSpec.dtype.
TRT_TYPES = {"FLOAT": "float32", "HALF": "float16", "BF16": "bfloat16",
             "INT64": "int64", "INT32": "int32", "BOOL": "bool"}


@dataclass(frozen=True)
class BufferSpec:
    """One device buffer (two for a state: a ping-pong pair) and the tensors bound to it."""

    name: str  # the graph tensor it feeds: "input_ids", "past_key_values.0.key", "logits"
    role: str  # "ids" | "mask" | "logits" | "key" | "value" | "conv" | "recurrent"
    dtype: str  # numpy-style, as in TensorSpec
    shape: tuple[int, ...]  # the largest tensor it holds
    binds: tuple[str, ...]  # a state's (past, present); the copies swap these roles each step
    copies: int = 1

    @property
    def nbytes(self) -> int:
        """Bytes of one copy."""
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class BufferPlan:
    """Every device buffer a session allocates, for one ShapeProfile's maxima (batch 1)."""

    buffers: tuple[BufferSpec, ...]
    prompt: int  # most tokens one step takes (input_ids max, or less: see buffer_plan)
    context: int  # most positions the cache holds (attention_mask max)

    def get(self, name: str) -> BufferSpec:
        return next(b for b in self.buffers if b.name == name)

    @property
    def state_bytes(self) -> int:
        """KV cache and fixed states, both ping-pong copies."""
        return sum(b.nbytes * b.copies for b in self.buffers if b.role in STATE_ROLES)

    @property
    def total_bytes(self) -> int:
        """Device bytes of every buffer (the engine's own activation memory comes on top)."""
        return sum(b.nbytes * b.copies for b in self.buffers)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "state_bytes": self.state_bytes, "total_bytes": self.total_bytes}


def buffer_plan(graph: ExportedGraph, shape_profile: dict[str, dict[str, list[int]]],
                logits_budget: int | None = LOGITS_BUDGET) -> BufferPlan:
    """The buffers for ``graph`` at ``shape_profile``'s maxima (``tensorrt.shape_profile``), as data.

    A present holds past + new <= the mask's max positions, one more than the past's max: each KV
    buffer is (1, KV, C_max, D) so that either copy can take either role. The logits of a step are
    (1, S, vocab): at L4's prompt max (8192) and a 152k vocabulary that is 5 GB in float32, so a step
    takes at most ``logits_budget`` bytes of logits and longer prompts prefill in chunks.
    """
    types = {t.name: t.dtype for t in (*graph.inputs, *graph.outputs)}
    prompt, context = shape_profile["input_ids"]["max"][1], shape_profile["attention_mask"]["max"][1]
    vocab = next(t.shape[-1] for t in graph.outputs if t.name == "logits")
    vocab = vocab if isinstance(vocab, int) else graph.model.vocab_size
    heads = ["logits", *([MTP_LOGITS] if MTP_LOGITS in types else [])]  # an MTP head's rows: as many, maybe narrower
    if logits_budget is not None:
        prompt = max(1, min(prompt, logits_budget // (vocab * ITEMSIZE[types["logits"]] * len(heads))))
    buffers = [
        BufferSpec("input_ids", "ids", types["input_ids"], (1, prompt), ("input_ids",)),
        BufferSpec("attention_mask", "mask", types["attention_mask"], (1, context), ("attention_mask",)),
        *[BufferSpec(name, name, types[name], (1, prompt, _columns(graph, name, vocab)), (name,)) for name in heads],
    ]
    for io in state_io(graph.layers):
        top = shape_profile[io.past]["max"]
        shape = (1, top[1], context, top[3]) if io.layer.has_kv else (1, *top[1:])
        buffers.append(BufferSpec(io.past, io.part, types[io.past], tuple(shape), (io.past, io.present), copies=2))
    return BufferPlan(tuple(buffers), prompt, context)


def _columns(graph: ExportedGraph, output: str, vocab: int) -> int:
    """The last dimension of ``output``: the vocabulary, or an MTP head's narrower one (--mtp-vocab)."""
    last = next(t.shape[-1] for t in graph.outputs if t.name == output)
    return last if isinstance(last, int) else vocab


def step_shapes(graph: ExportedGraph, past_len: int, new_len: int) -> dict[str, tuple[int, ...]]:
    """Every graph input's shape for one step that appends ``new_len`` tokens to ``past_len``."""
    shapes: dict[str, tuple[int, ...]] = {"input_ids": (1, new_len), "attention_mask": (1, past_len + new_len)}
    for io in state_io(graph.layers):
        layer = io.layer
        shapes[io.past] = ((1, layer.num_kv_heads, past_len, layer.head_dim) if layer.has_kv
                           else (1, *layer.states[io.part]))
    return shapes


class Executor(Protocol):
    """The vendor calls a PlanSession makes: TensorRT + CUDA on the GPU, ONNX Runtime in the tests."""

    def tensor_dtype(self, name: str) -> str: ...  # numpy-style name of an engine I/O tensor

    def allocate(self, nbytes: int) -> Any: ...  # a device buffer

    def upload(self, buffer: Any, array: np.ndarray) -> None: ...  # host -> device, at offset 0

    def zero(self, buffer: Any, nbytes: int) -> None: ...

    def download(self, buffer: Any, offset: int, out: np.ndarray) -> None: ...  # device -> host; out holds it on return

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None: ...

    def set_tensor_address(self, name: str, buffer: Any) -> None: ...

    def execute(self) -> None: ...  # enqueue one step (ordered before later uploads / downloads)

    def close(self) -> None: ...


class PlanSession:
    """The Session contract (edgekit.runtimes.base) over an :class:`Executor` and a BufferPlan.

    Prompts longer than the plan's prompt max run as consecutive chunks (prefill in pieces).
    """

    def __init__(self, graph: ExportedGraph, plan: BufferPlan, executor: Executor, description: str):
        self.graph, self.plan, self.executor = graph, plan, executor
        self._description = description
        self._check_dtypes()
        self._buffers = {b.name: [executor.allocate(b.nbytes) for _ in range(b.copies)] for b in plan.buffers}
        mask = plan.get("attention_mask")
        executor.upload(self._buffers[mask.name][0], np.ones(mask.shape, dtype=mask.dtype))
        self._bindings = [self._addresses(parity) for parity in (0, 1)]
        logits = plan.get("logits")
        self._row = np.empty((1, logits.shape[-1]), dtype=_host_dtype(logits.dtype))
        # per logits output: (row width, dtype); an MTP head's may be narrower (--mtp-vocab)
        self._rows = {b.name: (b.shape[-1], b.dtype) for b in plan.buffers if b.name in ("logits", MTP_LOGITS)}
        self.reset()

    def _check_dtypes(self) -> None:
        """The engine's I/O types must be the ones the buffers were sized for."""
        for spec in self.plan.buffers:
            for name in spec.binds:
                found = self.executor.tensor_dtype(name)
                if found != spec.dtype:
                    raise ArtifactError(
                        f"the engine's {name} is {found}, but export {self.graph.path} declares {spec.dtype}",
                        "rebuild the plan from this export: edgekit build EXPORT_DIR --runtime tensorrt")

    def _addresses(self, parity: int) -> dict[str, Any]:
        """Tensor -> buffer when the states' past copy is ``parity``."""
        bound = {}
        for spec in self.plan.buffers:
            copies = self._buffers[spec.name]
            if spec.copies == 2:
                past, present = spec.binds
                bound[past], bound[present] = copies[parity], copies[1 - parity]
            else:
                bound[spec.name] = copies[0]
        return bound

    @property
    def length(self) -> int:
        """Tokens held in the cache."""
        return self._length

    @property
    def max_context(self) -> int:
        """Positions the plan's buffers hold (the ShapeProfile's max context)."""
        return self.plan.context

    def reset(self, capacity: int = 0) -> None:
        """Empty the cache. ``capacity`` is accepted for the contract: the buffers already hold the max context."""
        self._length, self._parity, self._steps = 0, 0, 0
        self._mark = (0, 0, 0)  # (length, parity, steps) at the last checkpoint
        for spec in self.plan.buffers:
            if spec.role in ("conv", "recurrent"):  # fixed states start at zero; an empty KV past reads nothing
                self.executor.zero(self._buffers[spec.name][0], spec.nbytes)

    def forward(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Append ``token_ids``; returns their logits, (S, vocab) float32."""
        return self._run(token_ids, last_only=False)

    def last_logits(self, token_ids: list[int] | np.ndarray) -> np.ndarray:
        """Append ``token_ids``; returns the last one's logits, (vocab,) float32 (one row over PCIe)."""
        return self._run(token_ids, last_only=True)[0]

    def describe(self) -> str:
        """What runs it, for people."""
        return self._description

    rollback_in_place = False  # see rollback: the ping-pong layout depends on the length

    def checkpoint(self) -> None:
        """Mark this point; :meth:`rollback` returns to it after one step (no copy, no device call)."""
        self._mark = (self._length, self._parity, self._steps)

    def rollback(self, length: int) -> int:
        """Drop the tokens after ``length``: back to the checkpoint, whose length it returns.

        A step reads the states' past copy and writes the other, so after one step the past copy
        still holds the checkpoint's KV (laid out (1, KV, past, D)) and fixed states: flipping the
        parity back restores them all. Dropping KV rows in place would need a strided device copy
        (a present's layout depends on its length), so the caller feeds the kept tokens again.
        """
        marked, parity, steps = self._mark
        if not marked <= length <= self._length:
            raise InternalError(f"rollback to {length} outside the checkpoint's {marked}..{self._length} tokens")
        if length == self._length:
            return length
        if self._steps - steps != 1:
            raise InternalError(f"rollback over {self._steps - steps} engine steps; the ping-pong buffers keep one")
        self._length, self._parity, self._steps = marked, parity, steps
        return marked

    def close(self) -> None:
        """Free the device buffers, the context and the stream."""
        self.executor.close()

    def _run(self, token_ids: list[int] | np.ndarray, last_only: bool) -> np.ndarray:
        ids = np.ascontiguousarray(token_ids, dtype=np.int64).reshape(-1)
        self._check_room(ids.size)
        rows = []
        for start in range(0, ids.size, self.plan.prompt):
            chunk = ids[start:start + self.plan.prompt]
            self._step(chunk)
            if not last_only:  # the next chunk overwrites the logits buffer
                rows.append(self._fetch(0, chunk.size))
        return self._fetch(chunk.size - 1, 1) if last_only else np.concatenate(rows)

    def _check_room(self, count: int) -> None:
        """Refuse before any step, so a refused call leaves the cache as it was."""
        if count == 0:
            raise ArtifactError("no token ids to run", "pass at least one token id")
        total = self._length + count
        if total > self.plan.context:
            raise ArtifactError(
                f"sequence of {total} tokens exceeds the {self.plan.context} positions this TensorRT plan holds",
                "use a shorter prompt or fewer new tokens, or rebuild with a larger [shapes].context in the profile")

    def _step(self, chunk: np.ndarray) -> None:
        past, new = self._length, chunk.size
        ex = self.executor
        self._ids = chunk.reshape(1, new)  # kept alive until the next step: the upload is asynchronous
        ex.upload(self._buffers["input_ids"][0], self._ids)
        for name, shape in step_shapes(self.graph, past, new).items():
            ex.set_input_shape(name, shape)
        for name, buffer in self._bindings[self._parity].items():
            ex.set_tensor_address(name, buffer)
        ex.execute()
        self._parity ^= 1  # this step's presents are the next step's pasts
        self._length = past + new
        self._steps += 1

    @property
    def mtp_logits(self) -> np.ndarray | None:
        """The last step's MTP head rows (S, vocab) float32, on a plan exported with --mtp; else None.
        Downloaded when read: the proposer reads them once per verify."""
        if MTP_LOGITS not in self._buffers or not self._steps:
            return None
        return self._fetch(0, self._ids.shape[1], MTP_LOGITS)

    def _fetch(self, first_row: int, count: int, name: str = "logits") -> np.ndarray:
        """Rows [first_row, first_row + count) of the last step's ``name`` (logits), as float32."""
        width, dtype = self._rows[name]
        reuse = name == "logits" and count == 1
        out = self._row if reuse else np.empty((count, width), dtype=_host_dtype(dtype))
        self.executor.download(self._buffers[name][0], first_row * width * out.itemsize, out)
        if dtype == "bfloat16":  # NumPy has no bfloat16: widen the upper half of a float32
            return (out.astype(np.uint32) << 16).view(np.float32)
        return out.astype(np.float32)  # a copy: the row buffer is reused


def _host_dtype(dtype: str) -> np.dtype:
    return np.dtype(np.uint16 if dtype == "bfloat16" else dtype)


def refit_source(plan_path: Path, settings: dict[str, Any], folders: tuple[Path, ...] = (),
                 recorded: dict[str, dict[str, Any]] | None = None) -> Path | None:
    """The ONNX file a weight-stripped plan takes its weights from: None for a full plan.

    Looked for in ``folders`` (the source export, a bundle's weights) then beside the plan. With
    ``recorded`` (the build's ``tensorrt.refit_identity``), only the very files the plan was built
    with count (sizes, then sha256): TensorRT would refit from other weights without a word.
    """
    if not settings.get("strip_weights"):
        return None
    name = settings["refit_from"]
    candidates = [Path(folder) / name for folder in (*folders, Path(plan_path).parent)]
    found = next((path for path in candidates if path.is_file() and _same_weights(path, recorded)), None)
    if found is None:
        raise ArtifactError(
            f"{plan_path} was built without its weights; refitting needs {name}, in none of: "
            + ", ".join(str(path.parent) for path in candidates),
            "keep the export it was built from (its ONNX file and weights), or rebuild a full plan")
    return found


def _same_weights(model: Path, recorded: dict[str, dict[str, Any]] | None) -> bool:
    from edgekit.runtimes.tensorrt import refit_identity

    if not recorded:
        return True
    sizes = {name: (model.parent / name).stat().st_size for name in recorded if (model.parent / name).is_file()}
    return sizes == {name: want["bytes"] for name, want in recorded.items()} and refit_identity(model) == recorded


class TrtExecutor(CudaStream):
    """The vendor side of a PlanSession: a deserialized plan, one execution context, one stream."""

    def __init__(self, plan_path: Path, refit_onnx: Path | None = None, host_code: bool = False):
        trt = _tensorrt()
        self.trt, self.plan_path = trt, Path(plan_path)
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        if host_code:  # a version-compatible plan carries its own lean runtime, which must be allowed to load
            self.runtime.engine_host_code_allowed = True
        self.engine = self.runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self.engine is None:
            raise ArtifactError(
                f"TensorRT {trt.__version__} cannot load {plan_path} (see its log above)",
                "a plan loads only on the TensorRT version and GPU that built it: rebuild it here with "
                "edgekit build EXPORT_DIR --runtime tensorrt")
        if refit_onnx is not None:
            self._refit(Path(refit_onnx))
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise TensorrtRunError(
                f"TensorRT could not create an execution context for {plan_path} (see its log above)",
                "free GPU memory, or rebuild with smaller [shapes] maxima in the profile")
        self.names = {self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)}
        super().__init__()

    def _refit(self, onnx_path: Path) -> None:
        """Put the export's weights back into a weight-stripped engine."""
        trt, hint = self.trt, "refit from the export the plan was built from, or rebuild the plan"
        try:
            refitter = trt.Refitter(self.engine, self.logger)
        except TypeError:  # the bindings turn a null refitter (plan not refittable) into TypeError
            raise ArtifactError(f"{self.plan_path} is not refittable (built without strip_weights)",
                                "open it as a full plan, or rebuild with strip_weights") from None
        parser = trt.OnnxParserRefitter(refitter, self.logger)
        if not parser.refit_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise ArtifactError(f"TensorRT cannot refit {self.plan_path} from {onnx_path}: {errors}", hint)
        missing = list(refitter.get_missing_weights())
        if missing:
            raise ArtifactError(f"refitting {self.plan_path} from {onnx_path} left {len(missing)} weights unset "
                                f"(first: {missing[0]})", hint)
        if not refitter.refit_cuda_engine():
            raise ArtifactError(f"TensorRT failed to refit {self.plan_path} (see its log above)", hint)

    def tensor_dtype(self, name: str) -> str:
        if name not in self.names:
            raise ArtifactError(f"{self.plan_path} has no tensor {name!r}: it was built from another export",
                                "rebuild the plan from this export: edgekit build EXPORT_DIR --runtime tensorrt")
        kind = self.engine.get_tensor_dtype(name).name
        return TRT_TYPES.get(kind, kind.lower())

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> None:
        if not self.context.set_input_shape(name, shape):
            raise TensorrtRunError(
                f"TensorRT refused shape {tuple(shape)} for {name} (outside the plan's ShapeProfile)",
                "use a shorter prompt, or rebuild with larger [shapes] maxima in the profile")

    def set_tensor_address(self, name: str, buffer: int) -> None:
        if not self.context.set_tensor_address(name, buffer):
            raise TensorrtRunError(f"TensorRT refused the device address for {name}",
                                   "report this with the engine's edgekit.json")

    def execute(self) -> None:
        if not self.context.execute_async_v3(self.handle):
            raise TensorrtRunError(
                f"TensorRT failed to enqueue {self.plan_path} (see its log above)",
                "rerun with CUDA_LAUNCH_BLOCKING=1; if it persists, report it with the engine's edgekit.json")

    def engine_bytes(self) -> int:
        """Device memory the engine's context uses for activations (TensorRT >= 10.1 names it _v2)."""
        return int(getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size)

    def describe(self) -> str:
        return f"TensorRT {self.trt.__version__} on {self.device_name()}"

    def close(self) -> None:
        super().close()
        self.context = None  # the context before the engine, as TensorRT requires
        self.engine = None


class TensorrtSession(PlanSession):
    """One sequence on a native TensorRT plan, on the GPU; the Session contract.

    ``settings``: the build's TensorRT settings (``tensorrt.plan_settings`` plus what ``build``
    recorded). ``refit_folders``: where a weight-stripped plan's ONNX may be (the source export);
    ``refit_files``: the identity of the weights it was built with (see ``refit_source``).
    """

    def __init__(self, graph: ExportedGraph, plan_path: str | Path, settings: dict[str, Any],
                 refit_folders: tuple[Path, ...] = (), refit_files: dict[str, dict[str, Any]] | None = None):
        plan_path = Path(plan_path)
        refit = refit_source(plan_path, settings, refit_folders, refit_files)
        executor = TrtExecutor(plan_path, refit, host_code=bool(settings.get("version_compatible")))
        try:
            super().__init__(graph, buffer_plan(graph, settings["shape_profile"]), executor, executor.describe())
        except BaseException:
            executor.close()
            raise
        self.refitted = refit is not None

    def device_bytes(self) -> int:
        """The session's buffers plus the engine's activation memory."""
        return self.plan.total_bytes + self.executor.engine_bytes()


def _tensorrt():
    try:
        import tensorrt
    except ImportError as exc:
        raise MissingDependencyError(
            f"native TensorRT plans need TensorRT's Python package, which is not installed ({exc})",
            "pip install 'edgekit-llm[tensorrt]' (on JetPack it comes with the system: apt install python3-libnvinfer)",
        ) from None
    return tensorrt
