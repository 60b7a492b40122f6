"""Token log-probabilities for the OpenAI APIs, and the per-token step that records them.

Logprobs are the model's own distribution: a log-softmax of the raw logits, before temperature,
top-p or a grammar mask (as vLLM reports them), so that an evaluation harness scores the model,
not the sampler. With ``echo`` the prompt is scored teacher-forced: entry i is log p(ids[i] |
ids[:i]) from the logits of position i - 1, and the first token has none (``null``).

    Entry = (token id, logprob, [(top id, top logprob), ...])   top-k sorted, best first

The scheduler thread calls :func:`prefill` and :func:`pick` (through ``Job``); the handlers
format entries with :class:`Formatter`.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from edgekit.generate import sample

MAX_TOP = 20  # OpenAI's limit for logprobs / top_logprobs


class Entry(NamedTuple):
    """One token's logprob and the top-k alternatives at its position."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (sums of many prompt tokens keep 1e-6 precision)."""
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def entry(logp: np.ndarray, token: int, k: int) -> Entry:
    """The Entry of ``token`` under one row of log-probabilities ``logp`` (vocab,)."""
    top: list[tuple[int, float]] = []
    if k > 0:
        k = min(k, logp.size)
        best = np.argpartition(-logp, k - 1)[:k]
        best = best[np.argsort(-logp[best], kind="stable")]
        top = [(int(i), float(logp[i])) for i in best]
    return Entry(int(token), float(logp[token]), top)


def score(logits: np.ndarray, ids: list[int], k: int) -> list[Entry | None]:
    """Teacher-forced entries of ``ids`` from their own logits (S, vocab): the first is None."""
    logp = log_softmax(logits[:-1])  # (S - 1, vocab): position i predicts ids[i + 1]
    return [None, *(entry(row, token, k) for row, token in zip(logp, ids[1:]))]


def prefill(job: Any, engine: Any, row: int) -> np.ndarray:
    """The job's prompt forward in ``row`` -> its last logits (vocab,); with echo, also scores the prompt
    from every position's logits (both engines' ``prefill`` take ``keep_all``)."""
    if not job.echo:
        return engine.prefill(row, job.prompt_ids)
    logits = engine.prefill(row, job.prompt_ids, keep_all=True)  # (S, vocab)
    job.prompt_logprobs = score(logits, job.prompt_ids, job.logprobs or 0)
    return logits[-1]


def pick(job: Any, logits: np.ndarray, metrics: Any) -> None:
    """The next token of ``job`` from one row of logits (vocab,): mask, sample, record, accept.

    ``max_tokens`` 0 (scoring only, with echo) ends the job here without a token.
    """
    if job.max_tokens == 0:
        from edgekit.serve.scheduler import Event

        job.finish_reason = "length"
        job.emit(Event(finish_reason="length"))
        return
    masked = logits if job.processor is None else job.processor.mask(logits)
    token = sample(masked, job.sampling, job.rng)
    if job.logprobs is not None:
        job.token_logprobs.append(entry(log_softmax(logits), token, job.logprobs))
    if job.processor is not None:
        job.processor.accept(token)
    job.accept(token, metrics)


class Formatter:
    """Entries -> OpenAI ``logprobs`` objects; keeps the running ``text_offset`` of a stream.

    Offsets index the text the client receives, starting at ``offset``: the echoed prompt (decoded
    with its special tokens, as the echo is), then the completion (without them, as the reply's text
    is). A token inside a multi-byte character gets the offset where that character starts.
    """

    def __init__(self, tokenizer: Any, offset: int = 0):
        self.tokenizer = tokenizer
        self._prompt = _Offsets(tokenizer, offset, skip_special=False)
        self._reply: _Offsets | None = None

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token], skip_special_tokens=False) if self.tokenizer else str(token)

    def completion(self, ids: list[int], entries: list[Entry | None], prompt: int = 0) -> dict[str, list]:
        """/v1/completions: tokens, token_logprobs, top_logprobs ({text: logprob}), text_offset;
        the first ``prompt`` of ``ids`` are the echoed prompt's."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for i, (token, item) in enumerate(zip(ids, entries)):
            out["tokens"].append(self.text(token))
            out["token_logprobs"].append(None if item is None else item.logprob)
            out["top_logprobs"].append(None if item is None else {self.text(t): lp for t, lp in item.top})
            out["text_offset"].append(self._offsets(i < prompt).push(token))
        return out

    def _offsets(self, prompt: bool) -> "_Offsets":
        if prompt:
            return self._prompt
        if self._reply is None:  # the reply's text starts where the prompt's whole text ends
            self._reply = _Offsets(self.tokenizer, self._prompt.end(), skip_special=True)
        return self._reply

    def chat(self, entries: list[Entry]) -> dict[str, list]:
        """/v1/chat/completions: {"content": [{token, logprob, bytes, top_logprobs}, ...]}."""
        return {"content": [{**self._token(e.token, e.logprob),
                             "top_logprobs": [self._token(i, lp) for i, lp in e.top]} for e in entries]}

    def _token(self, token: int, logprob: float) -> dict[str, Any]:
        return {"token": self.text(token), "logprob": logprob, "bytes": list(self.raw_bytes(token))}

    def raw_bytes(self, token: int) -> bytes:
        """The token's own bytes: part of a UTF-8 character for a byte-level BPE or byte-fallback
        token (its decoded text would be U+FFFD), else its text's UTF-8."""
        piece = self.tokenizer.piece(token) if self.tokenizer is not None else None
        if piece is not None:
            table = _byte_decoder()
            if self.tokenizer.byte_level and all(c in table for c in piece):
                return bytes(table[c] for c in piece)
            if (fallback := re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece)) is not None:
                return bytes([int(fallback.group(1), 16)])
        return self.text(token).encode()


class _Offsets:
    """The running text offset of a token sequence, decoding only a short window of recent tokens
    (as the scheduler's detokenizer does): ids[prefix:read] give the context of the next token's text."""

    def __init__(self, tokenizer: Any, base: int, skip_special: bool):
        self.tokenizer, self.skip, self.done = tokenizer, skip_special, base  # done: the text of ids[:read]
        self.ids: list[int] = []
        self._prefix = self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def push(self, token: int) -> int:
        """The offset of ``token`` (the length of the complete text before it); then take it in."""
        offset = self.done
        if self.tokenizer is None:  # no tokenizer: no text, every offset is the start
            return offset
        self.ids.append(token)
        before, after = self._decode(self.ids[self._prefix:self._read]), self._decode(self.ids[self._prefix:])
        if not after.endswith("\ufffd"):  # else a character is still incomplete: its start stays the offset
            self.done += len(after) - len(before)
            self._prefix, self._read = self._read, len(self.ids)
        return offset

    def end(self) -> int:
        """The offset after every token so far, an incomplete character included."""
        if self.tokenizer is None or self._read == len(self.ids):
            return self.done
        window = self.ids[self._prefix:]
        return self.done + len(self._decode(window)) - len(self._decode(self.ids[self._prefix:self._read]))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level table inverted: the printable character a BPE piece uses -> the raw byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]  # space, control bytes...: shifted past 255
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table
