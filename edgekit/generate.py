"""Token generation over any runtime session: greedy or sampled, streamed, timed.

Device-side code: NumPy only (no torch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgekit.errors import EdgekitError


class Stepper(Protocol):
    """What generation needs from a runtime session."""

    def reset(self, capacity: int = 0) -> None: ...
    def forward(self, token_ids: list[int]) -> np.ndarray: ...


@dataclass(frozen=True)
class Sampling:
    """Sampling settings; all None means greedy."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature is None and self.top_k is None and self.top_p is None or self.temperature == 0

    def check(self) -> "Sampling":
        if self.temperature is not None and self.temperature < 0:
            raise EdgekitError(f"--temperature {self.temperature} is negative", "use 0 (greedy) or a positive value")
        if self.top_k is not None and self.top_k < 1:
            raise EdgekitError(f"--top-k {self.top_k} must be >= 1", "use e.g. --top-k 50")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise EdgekitError(f"--top-p {self.top_p} must be in (0, 1]", "use e.g. --top-p 0.9")
        return self


def token_id_problem(token_ids: list[int], vocab_size: int) -> str | None:
    """What is wrong with ``token_ids`` for a ``vocab_size`` embedding, or None.

    ONNX Runtime's Gather takes negative indices as counted from the end, so -1 would silently
    read the last row: every id must be in 0..vocab_size - 1.
    """
    bad = next((i for i in token_ids if not 0 <= i < vocab_size), None)
    if bad is None:
        return None
    return f"prompt token id {bad} is outside the vocabulary of {vocab_size} tokens (0..{vocab_size - 1})"


def context_problem(prompt_tokens: int, max_new_tokens: int, context: int,
                    option: str = "--max-new-tokens") -> str | None:
    """Why ``prompt_tokens`` + ``max_new_tokens`` do not fit ``context`` positions, or None.

    ``option`` names the budget as the caller's user sets it (``--max-new-tokens``, ``max_tokens``).
    """
    if prompt_tokens + max_new_tokens <= context:
        return None
    return f"{prompt_tokens} prompt tokens + {max_new_tokens} {option} exceed the context of {context} tokens"


def check_prompt(token_ids: list[int], max_new_tokens: int, vocab_size: int, context: int) -> None:
    """Refuse, before any work, a prompt with ids outside the vocabulary or one that cannot fit."""
    problem = token_id_problem(token_ids, vocab_size)
    if problem is not None:
        raise EdgekitError(problem, f"pass ids from 0 to {vocab_size - 1}")
    problem = context_problem(len(token_ids), max_new_tokens, context)
    if problem is not None:
        room = context - len(token_ids)
        hint = f"use --max-new-tokens {room} or less, or a shorter prompt" if room > 0 else "use a shorter prompt"
        raise EdgekitError(problem, hint)


def sample(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    if sampling.greedy:
        return int(np.argmax(logits))
    probs = distribution(logits, sampling)
    return int(rng.choice(probs.size, p=probs))


def distribution(logits: np.ndarray, sampling: Sampling) -> np.ndarray:
    """The probabilities ``sample`` draws from (temperature, top-k, top-p applied), float64.

    Speculative decoding's rejection rule needs them explicitly (``edgekit.speculative.verify``).
    """
    scores = logits.astype(np.float64) / (sampling.temperature or 1.0)
    if sampling.top_k is not None and sampling.top_k < scores.size:
        cutoff = np.partition(scores, -sampling.top_k)[-sampling.top_k]
        scores = np.where(scores < cutoff, -np.inf, scores)
    probs = np.exp(scores - scores.max())
    probs /= probs.sum()
    if sampling.top_p is not None and sampling.top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < sampling.top_p  # always keeps the top token
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return probs


@dataclass
class Generation:
    """The outcome of one generate call, with its timings."""

    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    stopped_by: str = "length"

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens after the first, per second of decoding."""
        steps = len(self.token_ids) - 1
        return steps / (self.decode_ms / 1000) if steps > 0 and self.decode_ms > 0 else 0.0


def generate(
    session: Stepper,
    prompt_ids: list[int],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos_ids: tuple[int, ...] = (),
    on_token: Callable[[int], None] | None = None,
    keep_cache: bool = False,
) -> Generation:
    """Prefill ``prompt_ids`` then decode up to ``max_new_tokens``; ``on_token`` streams each id.

    ``keep_cache`` continues the sequence already in the session (a chat turn) instead of resetting it.
    """
    if not prompt_ids:
        raise EdgekitError("the prompt is empty", "pass --prompt TEXT or --prompt-ids 1,2,3")
    result = Generation(prompt_tokens=len(prompt_ids))
    rng = np.random.default_rng(sampling.seed)
    if not keep_cache:
        session.reset(len(prompt_ids) + max_new_tokens)
    start = time.perf_counter()
    for token in _tokens(session, prompt_ids, max_new_tokens, sampling, rng):
        now = time.perf_counter()
        if not result.token_ids:
            result.ttft_ms = (now - start) * 1000
            decode_start = now
        else:
            result.decode_ms = (now - decode_start) * 1000
        result.token_ids.append(token)
        if on_token is not None:
            on_token(token)
        if token in eos_ids:
            result.stopped_by = "eos"
            break
    return result


def _tokens(session: Stepper, prompt_ids, max_new_tokens, sampling, rng) -> Iterator[int]:
    if max_new_tokens <= 0:
        return
    token = sample(step_logits(session, prompt_ids), sampling, rng)
    yield token
    for _ in range(max_new_tokens - 1):
        token = sample(step_logits(session, [token]), sampling, rng)
        yield token


def step_logits(session: Stepper, token_ids: list[int]) -> np.ndarray:
    """The last position's logits; sessions that can skip the others' (``last_logits``) do."""
    last = getattr(session, "last_logits", None)
    return last(token_ids) if last is not None else session.forward(token_ids)[-1]
