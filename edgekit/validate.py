"""``validate``: parity of an exported graph against the PyTorch reference.

Both run the same prompt; the engine is then teacher-forced with the reference's
greedy tokens so that one near-tie cannot derail the comparison of later steps.
Compared: logits of every prompt position and of each decode step.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgekit.errors import EdgekitError
from edgekit.types import ExportedGraph

# Max abs logit difference allowed per export dtype, against an fp32 reference.
TOLERANCE = {"fp32": 1e-3, "fp16": 0.1, "bf16": 0.5}
# Share of greedy tokens that must agree: exact in fp32, near-ties may flip in half precision.
MIN_AGREEMENT = {"fp32": 1.0, "fp16": 0.9, "bf16": 0.8}
# What must match between an export's recorded model and a reference for parity to mean anything.
IDENTITY = ("architecture", "vocab_size", "num_layers", "hidden_size")


@dataclass(frozen=True)
class ValidationReport:
    """Parity figures of one validate run."""

    passed: bool
    max_abs_diff: float
    min_cosine_similarity: float
    greedy_match: int
    greedy_total: int
    tolerance: float
    prompt_length: int
    dtype: str
    target: str

    def to_dict(self) -> dict:
        return asdict(self)


def validate(
    path: str | Path,
    reference: str,
    prompt_length: int = 16,
    steps: int = 32,
    tolerance: float | None = None,
    seed: int = 0,
) -> ValidationReport:
    """Compare the export at ``path`` with ``reference`` (folder, preset or hub id) in PyTorch.

    Quantized weights are refused unless ``tolerance`` is given: their logits differ by design
    (``measure_quality`` is the check for them).
    """
    from edgekit.runtimes.registry import open_engine
    from edgekit.types import Engine

    if prompt_length < 1 or steps < 1:
        raise EdgekitError("--prompt-length and --steps must be >= 1", "e.g. --prompt-length 16 --steps 32")
    engine = Engine.load(path)
    graph, quant = engine.graph, engine.quantized
    if quant is not None and tolerance is None:
        raise EdgekitError(
            f"{path} has {quant} weights: they change the logits by design, so comparing logits with "
            "PyTorch's within a tolerance says nothing about them",
            f"measure its quality instead: edgekit validate {path} --reference {reference} --quality TEXT "
            "(perplexity, top-1 agreement and KL on a text file), or pass --tolerance to compare logits anyway")
    check_reference(graph, reference)
    vocab = graph.model.vocab_size
    prompt = np.random.default_rng(seed).integers(1, vocab, size=prompt_length).tolist()
    ref_logits, ref_tokens = _reference(reference, prompt, steps)
    session = open_engine(engine)
    session.reset(prompt_length + steps)
    got = [session.forward(prompt)]
    for token in ref_tokens[:-1]:
        got.append(session.forward([token]))
    return _compare(graph, np.concatenate(got), ref_logits, prompt_length, tolerance)


def check_reference(graph: ExportedGraph, reference: str) -> None:
    """Refuse a ``reference`` whose config describes another model than the one ``graph`` was exported from.

    The dimensions come from the same code the export used (the family's ``spec``), so nested
    (image-text) configs read the same way on both sides.
    """
    from edgekit.errors import require

    require("transformers", "export")
    from edgekit.export import resolve
    from edgekit.export.archs import arch_for

    folder = resolve.resolve_model(reference)
    config = resolve.load_config(folder)
    spec = arch_for(config, folder / "config.json").spec(reference, {})
    mine = graph.model
    differ = [f"{name} export {getattr(mine, name)}, reference {getattr(spec, name)}" for name in IDENTITY
              if getattr(mine, name) != getattr(spec, name)]
    if differ:
        raise EdgekitError(
            f"--reference {reference} is not the model {graph.path} was exported from ({mine.source}): "
            + "; ".join(differ),
            f"pass the model it was exported from: --reference {mine.source}")


def _compare(graph, got, ref, prompt_length, tolerance) -> ValidationReport:
    """got/ref: (prompt_length + steps - 1, vocab); greedy compared from the last prompt row on."""
    diff = float(np.abs(got - ref).max())
    cos = (got * ref).sum(-1) / (np.linalg.norm(got, axis=-1) * np.linalg.norm(ref, axis=-1) + 1e-30)
    generated = slice(prompt_length - 1, None)
    match = int((got[generated].argmax(-1) == ref[generated].argmax(-1)).sum())
    total = got[generated].shape[0]
    tol = TOLERANCE[graph.dtype] if tolerance is None else tolerance
    needed = math.ceil(MIN_AGREEMENT[graph.dtype] * total)
    return ValidationReport(
        passed=bool(diff <= tol and match >= needed),
        max_abs_diff=diff,
        min_cosine_similarity=float(cos.min()),
        greedy_match=match,
        greedy_total=total,
        tolerance=tol,
        prompt_length=prompt_length,
        dtype=graph.dtype,
        target=graph.target,
    )


def _reference(reference: str, prompt: list[int], steps: int) -> tuple[np.ndarray, list[int]]:
    """PyTorch fp32 logits for the prompt and ``steps - 1`` greedy decode steps, and the greedy tokens."""
    from edgekit.runtimes.torch import TorchSession, load_reference

    session = TorchSession(load_reference(reference))
    rows = [session.forward(prompt)]  # (S, vocab)
    tokens = [int(rows[-1][-1].argmax())]
    for _ in range(steps - 1):
        rows.append(session.forward([tokens[-1]]))
        tokens.append(int(rows[-1][-1].argmax()))
    return np.concatenate(rows), tokens
