"""``measure_quality``: how much a (quantized) engine loses against the fp32 PyTorch reference.

    text ─export's tokenizer→ ids[:max_tokens] (all: None) ─windows of `window` tokens→
        engine  (session.forward, teacher-forced)  → logits (W, vocab) ┐
        reference (TorchSession.forward, fp32)        → logits (W, vocab) ┴→ perplexity of each,
                                                                              top-1 agreement, KL(ref ‖ engine)

Parity (``validate``) asks "is this the same function?"; quality asks "how much worse is it on
real text?", which is the question for int8/int4 builds whose logits differ by design.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.types import ExportedGraph

# A quantized engine passes when its perplexity is within this share of the reference's and its
# top-1 prediction agrees with the reference's on at least this share of tokens.
MAX_PERPLEXITY_INCREASE = 0.05
MIN_TOP1_AGREEMENT = 0.90
WINDOW = 256


@dataclass(frozen=True)
class QualityReport:
    """Quality figures of one engine on one text, next to the fp32 reference's."""

    passed: bool
    perplexity: float
    reference_perplexity: float
    top1_agreement: float
    kl_divergence: float
    tokens: int
    windows: int
    text_file: str

    @property
    def perplexity_increase(self) -> float:
        """Relative perplexity increase over the reference (0.03 = 3% worse)."""
        return self.perplexity / self.reference_perplexity - 1

    def to_dict(self) -> dict:
        return {**asdict(self), "perplexity_increase": self.perplexity_increase}


def measure_quality(path: str | Path, reference: str, text_file: str | Path, max_tokens: int | None = 1024,
                    window: int = WINDOW,
                    on_progress: Callable[[str, int, int], None] | None = None,
                    second_half: bool = False) -> QualityReport:
    """Teacher-force the first ``max_tokens`` tokens of ``text_file`` (None: the whole text) through
    the engine at ``path`` and through ``reference`` (folder, preset or hub id) in fp32 PyTorch, and compare.

    ``on_progress(what, done, total)`` is called before the models load and after each window.
    """
    progress = on_progress or (lambda what, done, total: None)
    from edgekit.runtimes.registry import open_engine
    from edgekit.runtimes.torch import TorchSession, load_reference

    graph = ExportedGraph.load(path)
    ids = text_token_ids(graph, text_file, max_tokens)
    progress("loading the engine and the reference", 0, 0)
    engine, ref = open_engine(path), TorchSession(load_reference(reference))
    return score_sessions(engine, ref, ids, min(window, graph.model.max_position_embeddings), str(text_file), progress,
                          second_half=second_half)


def score_sessions(engine: Any, reference: Any, ids: list[int], window: int, text_file: str = "",
                   on_progress: Callable[[str, int, int], None] | None = None,
                   second_half: bool = False) -> QualityReport:
    """Compare two teacher-forced sessions on ``ids``, in consecutive windows of ``window`` tokens.

    ``engine`` and ``reference`` are anything with ``reset(capacity)`` and ``forward(ids) -> (S, vocab)``
    logits: an engine's session, a PyTorch reference, or an ONNX Runtime session on another graph
    (a GPU precision's graph scored against the fp32 export on CPU).

    ``second_half``: llama.cpp's ``llama-perplexity`` scheme instead, for figures comparable with
    its own: whole windows only, each scoring the predictions of its second half (every scored
    token then has at least ``window / 2`` tokens of context).
    """
    progress = on_progress or (lambda what, done, total: None)
    windows = _windows(ids, window)
    if second_half:
        windows = [w for w in windows if len(w) == window]
        if not windows:
            raise EdgekitError(f"the text has {len(ids)} tokens, under one {window}-token window",
                               "pass a longer text or a smaller window")
    first = window // 2 if second_half else 0
    sums = np.zeros(4)  # engine NLL, reference NLL, top-1 agreements, KL; summed over predicted tokens
    count = 0
    for done, chunk in enumerate(windows, 1):
        engine.reset(len(chunk))
        reference.reset(len(chunk))
        got = _log_softmax(engine.forward(chunk)[first:-1])  # (W - 1 - first, vocab): predictions of chunk[first + 1:]
        want = _log_softmax(reference.forward(chunk)[first:-1])
        targets = np.asarray(chunk[first + 1:])
        rows = np.arange(len(targets))
        sums += [-got[rows, targets].sum(), -want[rows, targets].sum(),
                 (got.argmax(-1) == want.argmax(-1)).sum(), (np.exp(want) * (want - got)).sum()]
        count += len(targets)
        progress(f"scoring {Path(text_file).name or 'the text'}, window by window", done, len(windows))
    nll, ref_nll, agree, kl = sums / count
    perplexity, reference_perplexity, top1 = float(np.exp(nll)), float(np.exp(ref_nll)), float(agree)
    return QualityReport(
        passed=bool(perplexity <= reference_perplexity * (1 + MAX_PERPLEXITY_INCREASE) and top1 >= MIN_TOP1_AGREEMENT),
        perplexity=perplexity, reference_perplexity=reference_perplexity, top1_agreement=top1,
        kl_divergence=float(kl), tokens=count, windows=len(windows), text_file=str(text_file),
    )


def text_token_ids(graph: ExportedGraph, text_file: str | Path, max_tokens: int | None = None) -> list[int]:
    """``text_file`` encoded with the export's tokenizer: its first ``max_tokens`` tokens (None: all)."""
    return _token_ids(graph, Path(text_file), max_tokens)


def _token_ids(graph: ExportedGraph, text_file: Path, max_tokens: int | None) -> list[int]:
    from edgekit.tokenizer import load_tokenizer

    if not text_file.is_file():
        raise EdgekitError(f"--quality {text_file}: no such file", "pass a UTF-8 text file, e.g. held-out source code")
    if max_tokens is not None and max_tokens < 2:
        raise EdgekitError(f"max_tokens must be >= 2, got {max_tokens}", "e.g. max_tokens=1024")
    tokenizer = load_tokenizer(graph)
    if tokenizer is None:
        raise EdgekitError(f"{graph.path} has no tokenizer.json, so {text_file} cannot be encoded",
                           "export from a folder that has tokenizer.json")
    ids = tokenizer.encode(text_file.read_text(encoding="utf-8", errors="replace"))[:max_tokens]
    if len(ids) < 2:
        raise EdgekitError(f"{text_file} encodes to {len(ids)} token(s); at least 2 are needed", "pass a longer text")
    return ids


def _windows(ids: list[int], window: int) -> list[list[int]]:
    """Consecutive windows of ``window`` tokens; a 1-token tail has nothing to predict and is dropped."""
    return [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) >= 2]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
