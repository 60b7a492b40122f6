"""Speculative decoding in ``edgekit serve`` (``--speculative ngram|draft:PATH|draft|mtp``): per request,
while its row decodes alone.

    one row active, no grammar  ─propose k─ verify(pending + drafts) in one forward of that row
                                 ─accept (greedy: longest agreeing prefix; sampled: the rejection rule)
                                 ─rollback─ the tokens it keeps, then the target's own
    two or more rows             plain batched decode, one token per row (a row left behind by a
                                 rollback catches up first)

Why only alone: the ``ort`` engine's GroupQueryAttention takes several tokens per row only for one
row with a past, so speculating rows of a batch would each need their own forward, and a batched
step reads the weights once for every row (benchmarks/SPECULATIVE.md measures both). Greedy output
is exactly plain decoding's; sampled output has the target's distribution (edgekit.speculative.verify).
A request with a grammar (json_schema, tools) decodes plainly: its mask depends on each token before.
So does a sampled request with a ``seed``: speculation draws from its random stream differently than
plain decoding does, and a batch decodes plainly, so its text would depend on the server's load.

``mtp`` reads the head rows of the row's last forward (the head runs inside the target's graph, and
engines keep each row's ``mtp_logits``): alone, every step of a request is a verify whose rows propose
the next token; after plain batched steps the last one's row proposes.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from typing import Any

from edgekit.errors import EdgekitError
from edgekit.speculative import DEFAULT_DRAFT_TOKENS, check_draft_tokens, default_draft_tokens, draft_path, head_rows
from edgekit.speculative.verify import accept_greedy, accept_sampled
from edgekit.types import SIDECAR

SERVED = "ngram, draft:PATH, draft (the one a build carries) or mtp (the model's MTP head: export --mtp)"


def check_choice(choice: str | None, draft_tokens: int | None) -> str | None:
    """Refuse, before anything loads, options speculation in serve cannot take; -> the choice with a
    draft's path made absolute (Ray replicas open it from another working directory)."""
    check_draft_tokens(draft_tokens, choice is not None, choice)
    if choice is None:
        return None
    path = draft_path(choice)
    if choice not in ("ngram", "draft", "mtp") and path is None:
        raise EdgekitError(f"--speculative {choice!r} is not a proposer", f"use {SERVED}")
    if path is None:
        return choice
    folder = Path(path).expanduser().resolve()
    if not (folder / SIDECAR).is_file():
        raise EdgekitError(f"--speculative {choice}: {folder} is not an export or build (no {SIDECAR})",
                           "pass a folder made by edgekit export or edgekit build")
    return f"draft:{folder}"


def open_speculator(choice: str, engine: Any, draft_tokens: int | None, threads: int | None) -> "Speculator":
    """The speculator ``--speculative`` names, over ``engine``'s model (a draft's tokenizer is checked)."""
    from edgekit.speculative import open_proposer

    choice = check_choice(choice, draft_tokens)
    return Speculator(open_proposer(choice, engine.session, threads=threads),
                      draft_tokens or default_draft_tokens(choice), choice)


class Speculator:
    """Speculative rounds for a row decoding alone; ``proposed`` / ``accepted`` count over the server."""

    def __init__(self, proposer: Any, draft_tokens: int = DEFAULT_DRAFT_TOKENS, choice: str = ""):
        self.proposer, self.draft_tokens, self.choice = proposer, draft_tokens, choice
        # the MTP head proposes from the last forward's rows: each step is a verify, drafts or not
        self.every_step = getattr(proposer, "reads_head_rows", False)
        self._job: Any = lambda: None  # a weak reference to the job the proposer follows (a draft's cache holds its text)
        self._seen = 0  # the text length the proposer last observed

    def round(self, job: Any, engine: Any, metrics: Any) -> bool:
        """One verify step of ``job`` in row 0; False when plain decode should run instead (nothing
        proposed and nothing to catch up, or a request with a grammar)."""
        if job.processor is not None or job.cancelled.is_set() or job.sampling.seed is not None and not job.sampling.greedy:
            return False
        context = job.prompt_ids + job.token_ids
        cached = job.length
        pending = context[cached:]  # committed, not in the cache: the newest token, or more after a rollback
        drafts, probs = self._propose(job, context, engine, len(pending))
        if not drafts and len(pending) == 1 and not self.every_step:
            return False
        rows = engine.verify(0, pending + drafts, cached, len(drafts) + 1)  # (len(drafts) + 1, vocab)
        if job.sampling.greedy:
            kept, token = accept_greedy(rows, drafts)
        else:
            kept, token = accept_sampled(rows, drafts, probs, job.sampling, job.rng)
        job.length = engine.rollback(0, cached + len(pending) + kept)
        new = [*drafts[:kept], token]
        heads = head_rows(engine, self.proposer)  # the verify's last rows, the last at its last token
        first = cached if heads is None else cached + len(pending) + len(drafts) - len(heads)
        self.proposer.observe(context + new, first, heads)
        self._seen = len(context) + len(new)
        committed = _commit(job, new, rows, metrics)
        metrics.speculative_proposed.inc(len(drafts))
        metrics.speculative_accepted.inc(min(kept, committed))  # not those after the reply's end
        text = len(job.prompt_ids) + len(job.token_ids)
        if job.length > text:  # it ended inside the kept proposals: the cache holds exactly its text again
            job.length = engine.rollback(0, text)
        return True

    def _propose(self, job: Any, context: list[int], engine: Any, pending: int) -> tuple[list[int], Any]:
        """(draft tokens, their distributions or None) for ``job``: at most what its max_tokens leaves
        after the round's own token, and what the verify may feed (the engine's room, less ``pending``)."""
        new_job = job is not self._job()
        if new_job:  # a new request: the proposer starts afresh (a draft empties its cache)
            self._job = weakref.ref(job)
            if hasattr(self.proposer, "restart"):  # a draft or head samples as the request does
                self.proposer.restart(job.sampling, job.sampling.seed)
        # the prefill's rows; for the head also the last row of plain batched steps since its last round
        if new_job or self.every_step and self._seen != len(context):
            self.proposer.observe(context, 0, head_rows(engine, self.proposer))
            self._seen = len(context)
        k = min(self.draft_tokens, job.max_tokens - len(job.token_ids) - 1)
        room = engine.verify_room(job.length)
        if room is not None:  # the verify ends by a block end: the prefix cache's snapshot of states
            k = min(k, room - pending)
        if k <= 0:
            return [], None
        proposal = self.proposer.propose(context, k)
        drafts = proposal.tokens[:k]
        return drafts, proposal.probs[:len(drafts)] if proposal.probs is not None else None

    def settle(self, jobs: list[Any], engine: Any) -> None:
        """Before a plain batched step: a row a rollback left more than one token behind is fed up to
        its newest token (plain decode feeds exactly one per row)."""
        for row, job in enumerate(jobs):
            behind = (job.prompt_ids + job.token_ids)[job.length:-1]
            if behind:
                engine.verify(row, behind, job.length, 1)
                job.length = engine.rollback(row, job.length + len(behind))

    def close(self) -> None:
        close = getattr(self.proposer, "close", None)
        if close is not None:
            close()


def _commit(job: Any, tokens: list[int], rows: Any, metrics: Any) -> int:
    """Accept ``tokens`` (row i of ``rows`` predicted token i) until the job finishes; -> how many."""
    from edgekit.serve.logprobs import entry, log_softmax

    for i, (token, logits) in enumerate(zip(tokens, rows)):
        if job.logprobs is not None:
            job.token_logprobs.append(entry(log_softmax(logits), token, job.logprobs))
        job.accept(token, metrics)
        if job.finish_reason is not None:
            return i + 1
    return len(tokens)
