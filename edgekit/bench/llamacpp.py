"""llama.cpp as a bench peer: ``--compare llamacpp[:Q4_0|Q8_0|f16|f32]=BIN_DIR``.

    HF folder ─convert_hf_to_gguf.py (the build's own tree)─> f32/f16 GGUF ─llama-quantize─> Q4_0/Q8_0 GGUF
        (once, cached, untimed) ─llama-server (timed: load)─> POST /completion, streamed (timed: run)

``BIN_DIR`` holds ``llama-server`` and ``llama-quantize``; the converter comes from the source tree
that ``BIN_DIR/../CMakeCache.txt`` names, so the GGUF and the binaries are of one commit. The
converter runs under ``$EDGEKIT_LLAMACPP_PYTHON``, else the venv beside the build
(``BIN_DIR/../../venv/bin/python``), else this interpreter; it needs torch and transformers.
Timing is client side: a token counts when its streamed chunk arrives.
"""

from __future__ import annotations

import functools
import hashlib
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgekit.bench.contenders import ContenderFailed, Loaded, RunTiming, _local_model
from edgekit.errors import ConfigError, did_you_mean
from edgekit.types import ExportedGraph

VARIANTS = ("Q4_0", "Q8_0", "f16", "f32")
DEFAULT_VARIANT = "Q4_0"
CONVERTER = Path(__file__).with_name("llamacpp_convert.py")
PYTHON_ENV = "EDGEKIT_LLAMACPP_PYTHON"
MAX_CTX = 4096  # the server's KV cache is allocated whole at start: no more than a bench can use
HEALTH_TIMEOUT_S = 300.0
NEEDED = ("llama-server", "llama-quantize")


# ---- the build -----------------------------------------------------------------------------------

def find_build(bin_dir: str | Path, spec: str) -> Path:
    """``bin_dir`` resolved, once it holds the binaries the contender needs; else a ConfigError."""
    folder = Path(bin_dir).expanduser()
    example = "e.g. --compare llamacpp:Q4_0=/path/to/llama.cpp/build/bin"
    if not str(bin_dir):
        raise ConfigError(f"--compare {spec!r}: llama.cpp needs the folder of its binaries", example)
    if not folder.is_dir():
        raise ConfigError(f"--compare {spec!r}: {folder} is not a folder",
                          f"build llama.cpp (see docs/bench.md) and pass its bin folder, {example}")
    missing = [name for name in NEEDED if not (folder / name).is_file()]
    if missing:
        raise ConfigError(f"--compare {spec!r}: {folder} has no {' or '.join(missing)}",
                          f"build them: cmake --build BUILD --target {' '.join(NEEDED)}; {example}")
    return folder.resolve()


def source_tree(bin_dir: Path) -> Path | None:
    """The llama.cpp source tree the binaries were built from, as their CMakeCache.txt says."""
    cache = bin_dir.parent / "CMakeCache.txt"
    if not cache.is_file():
        return None
    found = {}
    for line in cache.read_text(errors="replace").splitlines():
        key, _, value = line.partition("=")
        found[key.split(":")[0]] = value.strip()
    tree = found.get("CMAKE_HOME_DIRECTORY") or found.get("llama.cpp_SOURCE_DIR")
    return Path(tree) if tree and (Path(tree) / "convert_hf_to_gguf.py").is_file() else None


def converter_python(bin_dir: Path) -> str:
    """The interpreter that runs the converter (it needs torch and transformers)."""
    beside = bin_dir.parent.parent / "venv" / "bin" / "python"
    return os.environ.get(PYTHON_ENV) or (str(beside) if beside.is_file() else sys.executable)


@functools.lru_cache(maxsize=None)
def llamacpp_version(bin_dir: Path) -> str:
    """``llama-server --version``'s first line, e.g. ``0.5.0-dev (build 1, commit 0c1e570)``."""
    result = subprocess.run([str(bin_dir / "llama-server"), "--version"], capture_output=True, text=True, timeout=60)
    for line in (result.stderr + result.stdout).splitlines():
        if line.startswith("version:"):
            return line.removeprefix("version:").strip()
    raise ContenderFailed(f"{bin_dir / 'llama-server'} --version printed no version (exit {result.returncode})")


@functools.lru_cache(maxsize=None)
def server_defaults(bin_dir: Path) -> dict[str, str]:
    """The defaults the contender leaves alone, as ``llama-server --help`` states them."""
    text = subprocess.run([str(bin_dir / "llama-server"), "--help"], capture_output=True, text=True, timeout=60).stdout
    found = {}
    patterns = {"batch": r"--batch-size N[^\n]*default: (\d+)", "ubatch": r"--ubatch-size N[^\n]*default: (\d+)",
                "flash-attn": r"--flash-attn [^\n]*default: '(\w+)'", "kv": r"--cache-type-k TYPE.*?\(default: (\w+)\)"}
    for name, pattern in patterns.items():
        match = re.search(pattern, text, re.S)
        found[name] = match.group(1) if match else "?"
    return found


def default_threads() -> int:
    """The CPUs this process may run on (``nproc``)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---- conversion ----------------------------------------------------------------------------------

def gguf_path(bin_dir: Path, model: Path, variant: str) -> Path:
    """Where the GGUF of ``model`` lives: keyed by the folder's files (names, sizes, times), the
    llama.cpp version, the converter wrapper, and the variant."""
    from edgekit._files import cache_dir

    files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in model.iterdir() if p.is_file())
    key = repr((str(model.resolve()), files, llamacpp_version(bin_dir), CONVERTER.read_bytes()))
    return cache_dir() / "bench" / "llamacpp" / f"{model.name}-{hashlib.sha1(key.encode()).hexdigest()[:10]}" \
        / f"{variant}.gguf"


def prepare_gguf(bin_dir: Path, model: Path, variant: str, threads: int | None = None) -> Path:
    """The GGUF of ``model`` in ``variant``: converted (f32, or f16) and quantized once, then cached."""
    out = gguf_path(bin_dir, model, variant)
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if variant in ("f32", "f16"):
        _convert(bin_dir, model, variant, out)
    else:
        base = prepare_gguf(bin_dir, model, "f32", threads)
        _tool([str(bin_dir / "llama-quantize"), str(base), str(_part(out)), variant, str(threads or default_threads())],
              out, "llama-quantize")
    return out


def _part(out: Path) -> Path:
    return out.with_name(f"{out.name}.{os.getpid()}.part")  # two benches converting at once do not collide


def _convert(bin_dir: Path, model: Path, outtype: str, out: Path) -> None:
    tree = source_tree(bin_dir)
    if tree is None:
        raise ContenderFailed(f"cannot find the llama.cpp source tree of {bin_dir}: {bin_dir.parent / 'CMakeCache.txt'}"
                              " names no tree with convert_hf_to_gguf.py (the converter must match the binaries)")
    python = converter_python(bin_dir)
    command = [python, str(CONVERTER), str(tree), str(model), "--outtype", outtype, "--outfile", str(_part(out))]
    _tool(command + _mtp_flags(model), out, f"the converter under {python} (set {PYTHON_ENV} to a python with "
                                            "torch, transformers and sentencepiece)")


def _mtp_flags(model: Path) -> list[str]:
    """Qwen3.5 / Qwen3-Next converters insist on an MTP head unless told there is none."""
    config = json.loads((model / "config.json").read_text())
    text = config.get("text_config") or config
    if str(text.get("model_type", "")).startswith(("qwen3_5", "qwen3_next")) and not text.get("mtp_num_hidden_layers"):
        return ["--no-mtp"]
    return []


def _tool(command: list[str], out: Path, what: str) -> None:
    """Run a conversion step into ``out``'s .part file, then rename; its log stays beside ``out``."""
    log = out.with_name(out.name + ".log")
    try:
        with open(log, "w") as sink:
            code = subprocess.run(command, stdout=sink, stderr=subprocess.STDOUT).returncode
    except OSError as exc:  # no such interpreter or binary
        raise ContenderFailed(f"{what}: cannot run {command[0]}: {exc.strerror or exc}") from None
    if code != 0:
        _part(out).unlink(missing_ok=True)
        raise ContenderFailed(f"{what} failed (exit {code}): {_last_line(log)} (log: {log})")
    _part(out).replace(out)


def _last_line(log: Path) -> str:
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


# ---- the contender -------------------------------------------------------------------------------

class LlamaCppContender:
    """llama.cpp's ``llama-server`` on its own GGUF of the export's source model, one slot, greedy."""

    def __init__(self, name: str, bin_dir: Path, model: str, variant: str = DEFAULT_VARIANT,
                 threads: int | None = None, ctx: int = MAX_CTX):
        self.name, self.bin_dir, self.model, self.variant = name, bin_dir, model, variant
        self.threads, self.ctx = threads or default_threads(), ctx
        self.gguf: Path | None = None
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._log: Any = None

    def server_command(self, gguf: Path) -> list[str]:
        """llama-server's arguments: llama.cpp's defaults but for the slot, context, threads and start."""
        return [str(self.bin_dir / "llama-server"), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(self.port),
                "-t", str(self.threads), "-tb", str(self.threads), "-c", str(self.ctx), "-np", "1",
                "--no-webui", "--no-warmup",  # warming up is the bench's job (its warmup rounds)
                "--cache-ram", "0"]  # no host-side prompt cache: every round prefills, and RSS holds no copies

    def load(self) -> Loaded:
        self.gguf = prepare_gguf(self.bin_dir, _local_model(self.model), self.variant, self.threads)  # untimed
        self.port = _free_port()
        # The server writes its own handle; this process reads the file by name (a shared handle
        # would share the write offset, and a seek here would move the server's writes).
        self._log = tempfile.NamedTemporaryFile("w", prefix="llama-server-", suffix=".log", delete=False)
        start = time.perf_counter()
        try:
            self._process = subprocess.Popen(self.server_command(self.gguf), stdout=self._log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, env=_server_env())
        except OSError as exc:
            raise ContenderFailed(f"cannot start {self.bin_dir / 'llama-server'}: {exc.strerror or exc}") from None
        self._wait_healthy()
        return Loaded((time.perf_counter() - start) * 1000, self.gguf.stat().st_size, self._detail())

    def _wait_healthy(self) -> None:
        deadline = time.perf_counter() + HEALTH_TIMEOUT_S
        while time.perf_counter() < deadline:
            if self._process.poll() is not None:
                raise ContenderFailed(f"llama-server exited ({self._process.returncode}): {self._log_tail()}")
            try:
                status, _ = self._request("GET", "/health", timeout=5)
                if status == 200:
                    return
            except OSError:  # not listening yet
                pass
            time.sleep(0.01)
        raise ContenderFailed(f"llama-server was not healthy after {HEALTH_TIMEOUT_S:.0f} s: {self._log_tail()}")

    def _detail(self) -> str:
        """What runs: the build, the GGUF's type, our flags, and the defaults it kept (from its --help)."""
        _, props = self._request("GET", "/props", timeout=10)
        props = props or {}
        n_ctx = (props.get("default_generation_settings") or {}).get("n_ctx", self.ctx)
        kept = ", ".join(f"{k} {v}" for k, v in server_defaults(self.bin_dir).items())
        return (f"llama.cpp {props.get('build_info') or llamacpp_version(self.bin_dir)} llama-server {self.variant} "
                f"({props.get('model_ftype', '?')}), -t {self.threads} -tb {self.threads} -c {n_ctx} -np 1; "
                f"defaults: {kept}")

    def run(self, prompt_ids: list[int], new_tokens: int) -> RunTiming:
        if len(prompt_ids) + new_tokens >= self.ctx:
            raise ContenderFailed(f"prompt {len(prompt_ids)} + {new_tokens} new tokens do not fit llama-server's "
                                  f"context of {self.ctx}")
        body = {"prompt": [int(t) for t in prompt_ids], "n_predict": new_tokens, "ignore_eos": True,
                "temperature": 0.0, "top_k": 1, "repeat_penalty": 1.0, "presence_penalty": 0.0,
                "frequency_penalty": 0.0, "dry_multiplier": 0.0, "cache_prompt": False, "stream": True,
                "return_tokens": True}
        start, stamps, ids, final, end = self._stream(body)
        ms = [(t - start) * 1000 for t in stamps]
        self._check(final, prompt_ids, new_tokens, len(stamps))
        if None in ids:  # held back by the server (a partial UTF-8 character): ask again, untimed
            ids = self._ids_untimed(body, ids)
        return RunTiming(len(prompt_ids), ms[0], tuple(b - a for a, b in zip(ms, ms[1:])),
                         (end - start) * 1000, tuple(ids))

    def _stream(self, body: dict) -> tuple[float, list[float], list[int | None], dict, float]:
        """Send one streamed completion; every token is stamped when the chunk that carries it arrives.

        A chunk says how many tokens are decoded so far (``tokens_predicted``) and carries the newest
        one; the server holds back a token that ends in a partial UTF-8 character, and the chunk that
        follows carries it in its count, not its ids.
        """
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        connection.connect()
        payload = json.dumps(body)
        stamps: list[float] = []
        ids: list[int | None] = []
        start = time.perf_counter()
        try:
            connection.request("POST", "/completion", payload, {"Content-Type": "application/json"})
            response = connection.getresponse()
            if response.status != 200:
                raise ContenderFailed(f"llama-server answered {response.status}: {response.read()[:300]!r}")
            for line in response:
                now = time.perf_counter()
                if line.startswith(b"error:"):
                    raise ContenderFailed(f"llama-server: {line[6:].strip()[:300].decode(errors='replace')}")
                if not line.startswith(b"data: "):
                    continue
                chunk = json.loads(line[6:])
                count = int(chunk.get("tokens_predicted") or 0)
                stamps += [now] * (count - len(stamps))
                ids += [None] * (count - len(ids))
                if chunk.get("tokens") and count:
                    ids[count - 1] = int(chunk["tokens"][-1])
                if chunk.get("stop"):
                    return start, stamps, ids, chunk, now
        except (OSError, http.client.HTTPException) as exc:  # the server died or hung up
            raise ContenderFailed(f"llama-server dropped the request ({type(exc).__name__}: {exc}): "
                                  f"{self._log_tail()}") from None
        finally:
            connection.close()
        raise ContenderFailed("llama-server's stream ended without a final chunk")

    def _check(self, final: dict, prompt_ids: list[int], new_tokens: int, got: int) -> None:
        timings = final.get("timings") or {}
        if timings.get("prompt_n") != len(prompt_ids) or timings.get("cache_n"):
            raise ContenderFailed(f"llama-server prefilled {timings.get('prompt_n')} of {len(prompt_ids)} prompt "
                                  f"tokens ({timings.get('cache_n')} from its cache)")
        if got != new_tokens:
            raise ContenderFailed(f"llama-server generated {got} of {new_tokens} tokens "
                                  f"(stop: {final.get('stop_type')}, truncated: {final.get('truncated')})")

    def _ids_untimed(self, body: dict, ids: list[int | None]) -> list[int]:
        status, reply = self._request("POST", "/completion", {**body, "stream": False})
        tokens = [int(t) for t in (reply or {}).get("tokens") or []]
        if status != 200 or len(tokens) != len(ids) or any(a is not None and a != b for a, b in zip(ids, tokens)):
            raise ContenderFailed(f"llama-server's token ids differ between a streamed and a plain request: "
                                  f"{ids} vs {tokens}")
        return tokens

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 600) -> tuple[int, Any]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, json.dumps(body) if body is not None else None,
                               {"Content-Type": "application/json"})
            response = connection.getresponse()
            data = response.read()
        finally:
            connection.close()
        try:
            return response.status, json.loads(data)
        except ValueError:
            return response.status, None

    def memory(self) -> dict[str, float | None]:
        """The server process's peak RSS (its VmHWM: binary, mapped GGUF, KV cache, buffers)."""
        peak = None
        if self._process is not None and self._process.poll() is None:
            status = Path(f"/proc/{self._process.pid}/status")
            if status.is_file():
                match = re.search(r"^VmHWM:\s+(\d+) kB", status.read_text(), re.M)
                peak = round(int(match.group(1)) / 1024, 1) if match else None
        return {"peak_rss_mb": peak, "peak_device_mb": None}

    def _log_text(self) -> str:
        return Path(self._log.name).read_text(errors="replace") if self._log is not None else ""

    def _log_tail(self) -> str:
        lines = [line.strip() for line in self._log_text().splitlines() if line.strip()]
        return lines[-1][:300] if lines else "no output"

    def close(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None
        if self._log is not None:
            self._log.close()
            Path(self._log.name).unlink(missing_ok=True)
            self._log = None


def _server_env() -> dict[str, str]:
    """This environment without LLAMA_ARG_* settings: the server runs the defaults ``detail`` reports."""
    return {k: v for k, v in os.environ.items() if not k.startswith("LLAMA_ARG_")}


def _free_port() -> int:
    with socket.socket() as probe:  # the kernel's pick of a free port; the server binds it a moment later
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def make_llamacpp(spec: str, label: str, variant: str, bin_dir: str, graph: ExportedGraph,
                  threads: int | None) -> LlamaCppContender:
    """``llamacpp[:VARIANT]=BIN_DIR`` from ``--compare``; bad input is a ConfigError naming it."""
    if variant and variant not in VARIANTS:
        raise ConfigError(f"--compare {spec!r}: llama.cpp variant {variant!r} is not one of "
                          f"{', '.join(VARIANTS)}.{did_you_mean(variant, list(VARIANTS))}",
                          "e.g. --compare llamacpp:Q4_0=/path/to/llama.cpp/build/bin")
    folder = find_build(bin_dir, spec)
    ctx = min(graph.model.max_position_embeddings or MAX_CTX, MAX_CTX)
    return LlamaCppContender(label, folder, graph.model.source, variant or DEFAULT_VARIANT, threads, ctx)


# ---- quality -------------------------------------------------------------------------------------

def llamacpp_quality(bin_dir: str | Path, model_folder: str | Path, variant: str, text_file: str | Path,
                     ctx: int = 1024, threads: int | None = None) -> dict[str, Any]:
    """llama.cpp's own quality figures of ``variant`` against its f32 GGUF, with ``llama-perplexity``.

    The f32 run saves its logits (``--kl-divergence-base``); the ``variant`` run compares with them
    (``--kl-divergence``). Returns ``{"variant", "ctx", "ppl_f32", "ppl", "mean_kld", "same_top_p"}``
    (same_top_p: the fraction of positions whose top-1 token equals f32's).
    """
    folder, model = Path(bin_dir).resolve(), Path(model_folder)
    if variant not in VARIANTS:
        raise ConfigError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}", "e.g. Q4_0")
    tool = folder / "llama-perplexity"
    if not tool.is_file():
        raise ConfigError(f"{folder} has no llama-perplexity",
                          "build it: cmake --build BUILD --target llama-perplexity")
    threads = str(threads or default_threads())
    base, quantized = prepare_gguf(folder, model, "f32"), prepare_gguf(folder, model, variant)
    with tempfile.TemporaryDirectory(prefix="edgekit-kld-") as work:
        logits = str(Path(work) / "f32.kld")
        first = _perplexity([str(tool), "-m", str(base), "-f", str(text_file), "-c", str(ctx), "-t", threads,
                             "--kl-divergence-base", logits], [BASE_PPL])
        second = _perplexity([str(tool), "-m", str(quantized), "-t", threads, "-c", str(ctx),
                              "--kl-divergence-base", logits, "--kl-divergence"], [MEAN_PPL, SAME_TOP, MEAN_KLD])
    return {"variant": variant, "ctx": ctx, "ppl_f32": _number(first, BASE_PPL), "ppl": _number(second, MEAN_PPL),
            "mean_kld": _number(second, MEAN_KLD), "same_top_p": round(_number(second, SAME_TOP) / 100, 5)}


BASE_PPL = r"Final estimate: PPL = ([\d.]+)"
MEAN_PPL = r"Mean PPL\(Q\)\s*:\s*([\d.]+)"
SAME_TOP = r"Same top p:\s*([\d.]+)"
MEAN_KLD = r"Mean\s+KLD:\s*(-?[\d.]+)"
FIGURES = {BASE_PPL: "Final estimate: PPL", MEAN_PPL: "Mean PPL(Q)", SAME_TOP: "Same top p", MEAN_KLD: "Mean KLD"}
TRIES = 3


def _perplexity(command: list[str], needed: list[str]) -> str:
    """Run ``llama-perplexity`` until its output holds every ``needed`` figure (at most TRIES runs).

    Its logger is an intentionally leaked singleton with a worker thread (common/log.cpp,
    llama.cpp issue 22142): lines still queued when ``main`` returns are lost, so on a busy machine
    a clean exit can come without the summary. The run is deterministic, so running it again is
    the same measurement."""
    for _ in range(TRIES):
        result = subprocess.run(command, capture_output=True, text=True)
        output = result.stdout + result.stderr
        if result.returncode != 0:
            lines = [line for line in output.splitlines() if line.strip()]
            raise ContenderFailed(f"llama-perplexity failed (exit {result.returncode}): {lines[-1] if lines else ''}")
        if all(re.search(pattern, output) for pattern in needed):
            return output
    missing = [pattern for pattern in needed if not re.search(pattern, output)]
    raise ContenderFailed(f"llama-perplexity exited cleanly {TRIES} times without printing "
                          f"{FIGURES.get(missing[0], missing[0])!r}; "
                          f"its last line: {output.strip().splitlines()[-1][:200] if output.strip() else 'none'}")


def _number(text: str, pattern: str) -> float:
    return float(re.search(pattern, text).group(1))
