"""Times one peer runtime for ``edgekit bench``, under whatever Python has that peer installed.

Self-contained on purpose (standard library at module level, no edgekit import): peers often
need package versions that cannot live beside edgekit's, so the bench starts
``/path/to/python peer_worker.py`` and talks to it. The in-process path calls the same
:class:`Worker`, so both ways measure alike.

Protocol: one JSON object per line on stdin, one JSON reply per line on stdout.

    {"op": "load", "kind": "genai", "model": HF_FOLDER, "variant": "int4", "threads": 2, "work_dir": DIR}
        -> {"load_ms": 812.5, "engine_bytes": 2384015360, "detail": "onnxruntime-genai 0.9.0 int4"}
    {"op": "run", "prompt_ids": [1, 2, 3], "new_tokens": 128}
        -> {"prompt_tokens": 3, "ttft_ms": 41.0, "step_ms": [...], "e2e_ms": 1290.3, "token_ids": [...]}
    {"op": "memory"} -> {"peak_rss_mb": 2710.2, "peak_device_mb": null}
    {"op": "bench", ...load fields..., "prompt_ids": [...], "new_tokens": 128, "runs": 5}
        -> {"load": {...}, "runs": [{...}, ...], "memory": {...}}   (all of the above at once)

A failure replies ``{"error": "..."}``; a peer that is not installed replies
``{"error": "not installed: pip install ..."}``. Kinds: ``optimum`` (ORTModelForCausalLM),
``genai`` (onnxruntime-genai, exported with its own model builder) and ``torch`` (transformers'
own ``generate``). Preparing a peer's model (optimum's export, genai's builder) runs in a child
process, so neither its time nor its memory counts as the peer's load.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

INSTALL = {
    "optimum": "pip install 'optimum-onnx[onnxruntime]'  (needs transformers < 4.58)",
    "genai": "pip install onnxruntime-genai transformers torch",
    "torch": "pip install torch transformers",
}
KINDS = tuple(INSTALL)


# ---- memory -------------------------------------------------------------------------------------

def status_mb(field: str) -> float | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM) in MiB; None off Linux."""
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) / 1024 if match else None


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@functools.lru_cache(maxsize=1)
def _nvml():
    """pynvml, initialized once (samplers ask every few ms), or None without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:
        return None


def gpu_process_mb() -> float | None:
    """GPU memory this process holds, over all NVIDIA GPUs (NVML); None without NVML or a GPU."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        used = 0
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == os.getpid() and proc.usedGpuMemory:
                    used += proc.usedGpuMemory
        return used / 2**20
    except Exception:  # a GPU gone, a driver error: "unknown"
        return None


class MemorySampler:
    """Peak RSS (and GPU memory) over a block, as growth over the RSS when the block began.

    RSS high-water is per process, so the peak of one phase needs a reset first: where Linux
    lets us reset VmHWM, the kernel's own peak is exact and no thread runs beside the timed
    code. Elsewhere (and for GPU memory, which has no high-water mark) a thread samples every
    ``interval_s``; it can miss spikes shorter than that. ``sample=True`` forces the thread.
    """

    def __init__(self, interval_s: float = 0.005, device: bool = False, sample: bool = False):
        self.interval_s, self.device, self.sample = interval_s, device, sample
        self._thread: threading.Thread | None = None
        self.base_mb = self.peak_mb = self.end_mb = 0.0
        self.device_base_mb = self.device_peak_mb = None
        self._stop = threading.Event()

    def __enter__(self) -> "MemorySampler":
        self._hwm = reset_peak()
        self.base_mb = self.peak_mb = status_mb("VmRSS") or 0.0
        if self.device:
            self.device_base_mb = self.device_peak_mb = gpu_process_mb()
        if self.sample or not self._hwm or self.device_peak_mb is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._take()

    def _take(self) -> None:
        self.peak_mb = max(self.peak_mb, status_mb("VmRSS") or 0.0)
        if self.device_peak_mb is not None:
            self.device_peak_mb = max(self.device_peak_mb, gpu_process_mb() or 0.0)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take()
        if self._hwm:
            self.peak_mb = max(self.peak_mb, status_mb("VmHWM") or 0.0)
        self.end_mb = status_mb("VmRSS") or 0.0

    @property
    def growth_mb(self) -> float:
        """Peak minus the RSS at the start of the block."""
        return self.peak_mb - self.base_mb

    @property
    def device_growth_mb(self) -> float | None:
        if self.device_peak_mb is None or self.device_base_mb is None:
            return None
        return self.device_peak_mb - self.device_base_mb


class MemoryTracker:
    """The memory one contender adds at its worst: while loading, or its loaded footprint
    plus the largest growth of any of its runs.

    Each phase is measured against the RSS just before it, so what other contenders in the
    same process already hold does not count.
    """

    def __init__(self, device: bool = False):
        self.device = device
        self.load_peak = self.retained = self.run_peak = 0.0
        self.device_load = self.device_run = None

    @contextlib.contextmanager
    def loading(self):
        with MemorySampler(device=self.device) as sampler:
            yield
        self.load_peak, self.retained = sampler.growth_mb, sampler.end_mb - sampler.base_mb
        self.device_load = sampler.device_growth_mb

    @contextlib.contextmanager
    def running(self):
        with MemorySampler(device=self.device) as sampler:
            yield
        self.run_peak = max(self.run_peak, sampler.growth_mb)
        if sampler.device_growth_mb is not None:
            self.device_run = max(self.device_run or 0.0, sampler.device_growth_mb)

    def summary(self) -> dict:
        """``{"peak_rss_mb", "peak_device_mb"}``; device memory is None unless tracked."""
        peak = max(self.load_peak, self.retained + self.run_peak)
        device = None
        if self.device_load is not None:
            device = self.device_load + (self.device_run or 0.0)
        return {"peak_rss_mb": round(peak, 1), "peak_device_mb": None if device is None else round(device, 1)}


# ---- timing -------------------------------------------------------------------------------------

class StepClock:
    """Timestamps of each new token, counted from the moment the request began."""

    def __init__(self):
        self.start = time.perf_counter()
        self.stamps: list[float] = []

    def tick(self, *_) -> None:
        self.stamps.append(time.perf_counter())

    def timing(self, prompt_tokens: int, token_ids: list[int]) -> dict:
        """The reply of a ``run``: time to first token, per-step latencies, end to end (ms)."""
        end = time.perf_counter()
        ms = [(t - self.start) * 1000 for t in self.stamps]
        return {"prompt_tokens": prompt_tokens, "ttft_ms": ms[0] if ms else None,
                "step_ms": [b - a for a, b in zip(ms, ms[1:])], "e2e_ms": (end - self.start) * 1000,
                "token_ids": [int(t) for t in token_ids]}


class _Streamer:
    """transformers' streamer contract: the first ``put`` is the prompt, each later one a token."""

    def __init__(self, clock: StepClock):
        self.clock, self.seen_prompt = clock, False

    def put(self, value) -> None:
        if self.seen_prompt:
            self.clock.tick()
        self.seen_prompt = True

    def end(self) -> None:
        pass


# ---- peers --------------------------------------------------------------------------------------

def _folder_bytes(folder: Path, patterns: tuple[str, ...]) -> int:
    return sum(p.stat().st_size for pattern in patterns for p in Path(folder).glob(pattern) if p.is_file())


def _prepared(work_dir: str, kind: str, model: str, variant: str) -> Path:
    """Where this peer's own export of ``model`` lives: one per model folder, its files' sizes and
    times (a folder saved anew gets a new export) and variant."""
    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(model).iterdir() if p.is_file())
    key = hashlib.sha1(repr((str(Path(model).resolve()), files)).encode()).hexdigest()[:10]
    return Path(work_dir) / f"{kind}-{variant or 'default'}-{key}"


def _prepare(command: list[str], out: Path) -> None:
    """Run a peer's exporter in a child process once; its output folder marks it done."""
    if (out / ".done").exists():
        return
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        lines = [line for line in (result.stderr or result.stdout).strip().splitlines() if line.strip()]
        raise RuntimeError(f"export failed: {lines[-1] if lines else 'exit ' + str(result.returncode)}")
    (out / ".done").write_text("")


MODULES = {"optimum": "optimum", "genai": "onnxruntime_genai", "torch": "transformers"}


def prepare_peer(kind: str, model: str, variant: str, work_dir: str) -> Path:
    """The folder the peer loads: its own export of ``model``, made once in a child process."""
    import importlib.util

    if importlib.util.find_spec(MODULES[kind]) is None:  # before exporting: name the missing package
        raise ModuleNotFoundError(f"No module named {MODULES[kind]!r}", name=MODULES[kind])
    if kind == "torch":
        return Path(model)
    out = _prepared(work_dir, kind, model, variant)
    if kind == "optimum":
        command = ["-m", "optimum.exporters.onnx", "--model", model, "--task", "text-generation-with-past", str(out)]
    else:
        command = ["-m", "onnxruntime_genai.models.builder", "-i", model, "-o", str(out),
                   "-p", variant, "-e", "cpu", "-c", str(out) + ".cache"]
    _prepare([sys.executable, *command], out)
    return out


class HfPeer:
    """A model with transformers' ``generate``: optimum's ORTModelForCausalLM, or torch eager."""

    def __init__(self, kind: str, folder: Path, threads: int | None):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.torch = torch
        if kind == "optimum":
            self.model, self.detail = self._optimum(folder, threads)
            self.engine_bytes = _folder_bytes(folder, ("*.onnx", "*.onnx_data", "*.onnx.data"))
        else:
            import transformers

            self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            self.detail = f"transformers {transformers.__version__} eager, torch {torch.__version__}"
            self.engine_bytes = _folder_bytes(folder, ("*.safetensors", "*.bin"))

    @staticmethod
    def _optimum(folder: Path, threads: int | None):
        import onnxruntime
        from optimum.onnxruntime import ORTModelForCausalLM

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or 0
        model = ORTModelForCausalLM.from_pretrained(folder, session_options=options, provider="CPUExecutionProvider")
        return model, f"optimum-onnx {_version('optimum-onnx')}, onnxruntime {onnxruntime.__version__} fp32"

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict:
        clock = StepClock()
        ids = self.torch.tensor([prompt_ids])
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, do_sample=False, streamer=_Streamer(clock),
                                      pad_token_id=0)
        return clock.timing(len(prompt_ids), out[0, len(prompt_ids):].tolist())


class GenaiPeer:
    """onnxruntime-genai on the model its own builder exported (``-p fp32|fp16|int4 -e cpu``)."""

    def __init__(self, folder: Path, variant: str, threads: int | None):
        _set_genai_threads(folder / "genai_config.json", threads)
        import onnxruntime_genai as og

        self.og = og
        self.model = og.Model(str(folder))
        self.detail = f"onnxruntime-genai {_version('onnxruntime-genai')} {variant}"
        self.engine_bytes = _folder_bytes(folder, ("*.onnx", "*.onnx.data", "*.onnx_data"))

    def run(self, prompt_ids: list[int], new_tokens: int) -> dict:
        og, clock = self.og, StepClock()
        params = og.GeneratorParams(self.model)
        total = len(prompt_ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens([prompt_ids])
        tokens = []
        while not generator.is_done():
            generator.generate_next_token()
            clock.tick()
            tokens.append(int(generator.get_next_tokens()[0]))
        return clock.timing(len(prompt_ids), tokens)


def _version(distribution: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "?"


def _set_genai_threads(config_path: Path, threads: int | None) -> None:
    """genai reads intra-op threads from its config, not from an API call."""
    config = json.loads(config_path.read_text())
    options = config["model"]["decoder"].setdefault("session_options", {})
    if threads:
        options["intra_op_num_threads"] = threads
    else:
        options.pop("intra_op_num_threads", None)
    config_path.write_text(json.dumps(config, indent=4))


def load_peer(kind: str, folder: Path, variant: str, threads: int | None):
    """Load a prepared peer; importing its library counts as part of loading."""
    if kind == "genai":
        return GenaiPeer(folder, variant, threads)
    return HfPeer(kind, folder, threads)


# ---- protocol -----------------------------------------------------------------------------------

class Worker:
    """Answers protocol requests (dicts); keeps the loaded peer and its memory tracker."""

    def __init__(self):
        self.peer = None
        self.memory = MemoryTracker()

    def handle(self, request: dict) -> dict:
        """One reply; never raises (errors become ``{"error": ...}``)."""
        op = request.get("op", "bench")
        try:
            return getattr(self, f"_{op}")(request)
        except ImportError as exc:
            return {"error": f"not installed: {INSTALL.get(request.get('kind') or '', 'pip install ' + str(exc.name))}"
                             f" ({exc})"}
        except Exception as exc:  # a peer's failure is a result to report, not a crash
            return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:400]}"}

    def _load(self, request: dict) -> dict:
        kind, variant = request["kind"], request.get("variant") or "fp32"
        if kind not in KINDS:
            raise ValueError(f"unknown peer kind {kind!r}; kinds: {', '.join(KINDS)}")
        folder = prepare_peer(kind, request["model"], variant, request.get("work_dir") or ".")
        start = time.perf_counter()
        with self.memory.loading():
            self.peer = load_peer(kind, folder, variant, request.get("threads"))
        load_ms = (time.perf_counter() - start) * 1000
        return {"load_ms": load_ms, "engine_bytes": self.peer.engine_bytes, "detail": self.peer.detail}

    def _run(self, request: dict) -> dict:
        if self.peer is None:
            raise RuntimeError("no peer is loaded: send a 'load' request first")
        with self.memory.running():
            return self.peer.run(list(request["prompt_ids"]), int(request["new_tokens"]))

    def _memory(self, request: dict) -> dict:
        return self.memory.summary()

    def _bench(self, request: dict) -> dict:
        load = self.handle({**request, "op": "load"})
        if "error" in load:
            return load
        runs = [self.handle({**request, "op": "run"}) for _ in range(int(request.get("runs", 1)))]
        return {"load": load, "runs": runs, "memory": self.memory.summary()}


def main() -> None:
    """Serve requests from stdin until it closes."""
    # Replies get a private copy of stdout; fd 1 itself goes to stderr, so whatever a peer
    # library prints (C++ logs included) cannot corrupt the protocol.
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    worker = Worker()
    for line in sys.stdin:
        if line.strip():
            replies.write(json.dumps(worker.handle(json.loads(line))) + "\n")
            replies.flush()


if __name__ == "__main__":
    main()
