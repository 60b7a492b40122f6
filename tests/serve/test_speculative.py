"""Speculative decoding in serve: a row decoding alone verifies proposals; its output is plain decoding's.

The scripted proposer below knows each prompt's plain greedy continuation and breaks one token in
two rounds of three, so rounds keep anything from 0 to k proposals and every rollback path runs:
attention rows dropped by length, Gated DeltaNet states returned to the verify's start (the kept
tokens fed with the next round, or before a batched step when other rows join).
"""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.generate import Sampling, generate
from edgekit.runtimes.registry import open_engine
from edgekit.serve.engine import BatchedEngine, SerialEngine, serving_engine
from edgekit.serve.scheduler import Job, Scheduler
from edgekit.serve.speculate import Speculator
from edgekit.speculative import Proposal
from edgekit.types import ExportedGraph
from tests.cli.test_cli import edgekit
from tests.serve.conftest import free_port
from tests.serve.test_metrics import value

PROMPTS = [[3, 17, 42, 7, 99, 100, 5, 64], [8, 250, 31, 77, 12], [5, 6, 7, 8, 9, 10, 11]]
NEW = 20


class Scripted:
    """Proposes each prompt's plain continuation, with one wrong token in two calls of three."""

    def __init__(self, references: dict[tuple[int, ...], list[int]]):
        self.references, self.calls, self.observed_new = references, 0, 0

    def propose(self, context, k):
        self.calls += 1
        prompt = next(p for p in self.references if tuple(context[:len(p)]) == p)
        start = len(context) - len(prompt)
        tokens = list(self.references[prompt][start:start + k])
        if tokens and self.calls % 3:
            i = self.calls % len(tokens)
            tokens[i] = (tokens[i] + 1) % 1000
        return Proposal(tokens)

    def observe(self, context, first, hidden):
        self.observed_new += first == 0


def references(graph, prompts, new=NEW):
    session = open_engine(graph.path, threads=1)
    return {tuple(p): generate(session, p, new).token_ids for p in prompts}


def job(prompt, n=NEW, sampling=Sampling(temperature=0), logprobs=None):
    return Job(prompt, n, sampling, (), [], None, lambda e: None, logprobs=logprobs)


def behind(job) -> int:
    """Committed tokens not in the row's cache, beyond the newest (which plain decode feeds)."""
    return len(job.prompt_ids) + len(job.token_ids) - 1 - job.length


def counted(scheduler, what: str) -> float:
    """edgekit_speculative_{proposed,accepted}_tokens_total as /metrics exposes it."""
    return value(scheduler.metrics.render(), f"edgekit_speculative_{what}_tokens_total")


def step_until_done(scheduler, limit=10_000):
    for _ in range(limit):
        if not (scheduler.waiting or scheduler.active):
            return
        scheduler.step()
    raise AssertionError("the jobs did not finish")


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_a_row_alone_speculates_and_rows_that_join_decode_exactly(exported, architecture):
    """One job speculates alone (with rejections); two more join mid-flight, so the batch decodes
    plainly (a Gated DeltaNet row left behind by a rollback catches up first); the last one left
    speculates again. Every job's tokens are plain greedy decoding's."""
    graph = ExportedGraph.load(exported(architecture, "ort"))
    engine, _ = serving_engine(graph, max_batch=4, max_context=128, threads=1)
    assert isinstance(engine, BatchedEngine)
    expected = references(graph, PROMPTS)
    speculator = Speculator(Scripted(expected), draft_tokens=4)
    scheduler = Scheduler(engine, speculator=speculator)
    jobs = [job(p, NEW - 6 * i) for i, p in enumerate(PROMPTS)]
    scheduler.submit(jobs[0])
    for steps in range(1, 7):  # until a rollback leaves a Gated DeltaNet row behind its text
        scheduler.step()
        if behind(jobs[0]):
            break
    assert bool(behind(jobs[0])) == engine.stateful
    assert counted(scheduler, "proposed") > 0 and len(jobs[0].token_ids) > steps  # more than a token a step
    scheduler.submit(jobs[1])
    scheduler.submit(jobs[2])
    step_until_done(scheduler)
    assert scheduler.peak_active == 3
    for prompt, done in zip(PROMPTS, jobs):
        assert done.token_ids == expected[tuple(prompt)][:done.max_tokens] and done.finish_reason == "length"
    accepted = counted(scheduler, "accepted")
    assert 0 < accepted < counted(scheduler, "proposed")


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_an_end_inside_the_kept_proposals_leaves_a_cache_the_next_turn_resumes(exported, architecture):
    """A request ends at an end-of-sequence id among the proposals it kept: the row's cache held more
    than its text, so it is rolled back to the text before the prefix cache keeps it (a Gated DeltaNet
    snapshot must be the states of exactly that text). The next turn resumes from it exactly."""
    graph = ExportedGraph.load(exported(architecture, "ort"))
    engine = BatchedEngine(open_engine(graph.path, threads=1), 2, 256, prefix_cache_bytes=1 << 24, prefix_block=4)
    prompt = [3, 17, 42, 7, 99, 100, 5, 64, 12, 8, 250]
    reference = references(graph, [prompt], 12)[tuple(prompt)]
    end = next(i for i in range(2, 5) if reference[i] not in reference[:i])  # a kept proposal, seen once
    first = Job(prompt, 12, Sampling(temperature=0), (reference[end],), [], None, lambda e: None)
    scheduler = Scheduler(engine, speculator=Speculator(Scripted({tuple(prompt): reference}), draft_tokens=4))
    scheduler.speculator.proposer.calls = 2  # the first round's proposal is exact: every token kept
    scheduler.submit(first)
    step_until_done(scheduler)
    assert first.token_ids == reference[:end + 1] and first.finish_reason == "stop"
    follow = prompt + first.token_ids + [9, 10]
    second = job(follow, 6)
    scheduler.submit(second)
    step_until_done(scheduler)
    assert engine.prefix_cache.hit_tokens > len(prompt)  # the second turn resumed after the first reply
    assert second.token_ids == generate(open_engine(graph.path, threads=1), follow, 6).token_ids


def test_speculating_states_are_snapshot_at_block_ends_for_the_prefix_cache(exported):
    """A Gated DeltaNet row is snapshot where a block ends (decode does so every step): a verify is cut
    to end there, so a later prompt sharing the reply up to that block end resumes from it."""
    graph = ExportedGraph.load(exported("Qwen3_5ForCausalLM", "ort"))
    engine = BatchedEngine(open_engine(graph.path, threads=1), 2, 256, prefix_cache_bytes=1 << 24, prefix_block=4)
    prompt = [3, 17, 42, 7, 99, 100, 5, 64, 12, 8, 250]
    reference = references(graph, [prompt], 12)[tuple(prompt)]
    proposer = Scripted({tuple(prompt): reference})
    proposer.calls = -10**6 * 3  # calls % 3 == 0 for a while: every proposal exact
    scheduler = Scheduler(engine, speculator=Speculator(proposer, draft_tokens=4))
    scheduler.submit(job(prompt, 12))
    step_until_done(scheduler)
    follow = (prompt + reference)[:16] + [9, 10]  # block ends at 4, 8, 12, 16: 16 is inside the reply
    second = job(follow, 5)
    scheduler.submit(second)
    step_until_done(scheduler)
    assert engine.prefix_cache.hit_tokens == 16
    assert second.token_ids == generate(open_engine(graph.path, threads=1), follow, 5).token_ids


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_a_serial_engine_speculates_each_request(exported, architecture):
    graph = ExportedGraph.load(exported(architecture, "portable"))
    engine, reason = serving_engine(graph, max_batch=4, max_context=128, threads=1)
    assert isinstance(engine, SerialEngine) and reason
    expected = references(graph, PROMPTS)
    proposer = Scripted(expected)
    scheduler = Scheduler(engine, speculator=Speculator(proposer, draft_tokens=3))
    jobs = [job(p) for p in PROMPTS]
    for item in jobs:
        scheduler.submit(item)
    step_until_done(scheduler)
    assert [j.token_ids for j in jobs] == [expected[tuple(p)] for p in PROMPTS]
    assert proposer.observed_new == len(PROMPTS)  # each request starts the proposer afresh
    assert counted(scheduler, "accepted") > 0


def test_logprobs_of_speculated_tokens_are_the_models(exported):
    """A verify row is the model's distribution at that position: the same entries as plain decoding."""
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    expected = references(graph, PROMPTS[:1])
    runs = []
    for speculator in (None, Speculator(Scripted(expected), draft_tokens=4)):
        engine, _ = serving_engine(graph, max_batch=2, max_context=128, threads=1)
        scheduler = Scheduler(engine, speculator=speculator)
        runs.append(job(PROMPTS[0], logprobs=3))
        scheduler.submit(runs[-1])
        step_until_done(scheduler)
    plain, fast = runs
    assert fast.token_ids == plain.token_ids
    assert len(plain.token_logprobs) == len(fast.token_logprobs) == NEW
    for a, b in zip(plain.token_logprobs, fast.token_logprobs):
        assert a.token == b.token and [t for t, _ in a.top] == [t for t, _ in b.top]
        assert abs(a.logprob - b.logprob) < 1e-4


def test_sampled_point_mass_proposals_are_kept_by_the_rule(exported):
    """Prompt-lookup-like proposals (no distribution: q = 1) under near-greedy sampling: the rule keeps
    those the target would likely draw, and the reply is whole."""
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=2, max_context=128, threads=1)
    scheduler = Scheduler(engine, speculator=Speculator(Scripted(references(graph, PROMPTS[:1])), draft_tokens=4))
    item = job(PROMPTS[0], sampling=Sampling(temperature=0.02))
    scheduler.submit(item)
    step_until_done(scheduler)
    assert len(item.token_ids) == NEW and item.finish_reason == "length"
    assert 0 < counted(scheduler, "accepted") <= counted(scheduler, "proposed")


def test_a_sampled_draft_is_kept_by_the_rejection_rule_and_repeats_under_a_seed(exported):
    """The target drafting for itself, sampled: its proposals' distributions are the target's own, so
    the rule keeps every one (a misaligned distribution would reject some). A seeded request does not
    speculate (its text must not depend on the load); an unseeded one does, and the draft follows it."""
    from edgekit.serve.speculate import open_speculator

    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=2, max_context=128, threads=1)
    scheduler = Scheduler(engine, speculator=open_speculator(f"draft:{graph.path}", engine, 3, threads=1))
    outputs = []
    for seed in (None, 5, 5):
        item = job(PROMPTS[0], sampling=Sampling(temperature=0.8, seed=seed))
        scheduler.submit(item)
        step_until_done(scheduler)
        outputs.append(item.token_ids)
        if seed is None:
            proposed = counted(scheduler, "proposed")
            assert proposed > 0 and counted(scheduler, "accepted") == proposed
    assert counted(scheduler, "proposed") == proposed  # the seeded requests decoded plainly
    assert outputs[1] == outputs[2] and len(outputs[0]) == NEW
    scheduler.speculator.close()


def test_a_request_with_a_grammar_decodes_plainly(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=2, max_context=128, threads=1)
    proposer = Scripted(references(graph, PROMPTS[:1]))
    scheduler = Scheduler(engine, speculator=Speculator(proposer))

    class AllowAll:  # a processor that masks nothing: the job still counts as constrained
        def mask(self, logits):
            return logits

        def accept(self, token):
            pass

    item = Job(PROMPTS[0], 6, Sampling(temperature=0), (), [], None, lambda e: None, processor=AllowAll())
    scheduler.submit(item)
    step_until_done(scheduler)
    assert len(item.token_ids) == 6 and proposer.calls == 0


def test_serve_answers_as_without_speculation(tiny_code_export):
    """Over HTTP with prompt lookup on the trained preset: the same completion, and /metrics counts."""
    import httpx

    from tests.serve.conftest import LiveServer

    prompt = "def add(a, b):\n    return a + b\n\n\ndef add(a, b):\n"
    texts = []
    for extra in ({}, {"speculative": "ngram", "draft_tokens": 6}):
        with LiveServer(tiny_code_export, max_batch=4, max_context=256, threads=1, **extra) as server:
            reply = server.client().completions.create(model="m", prompt=prompt, max_tokens=48, temperature=0)
            texts.append(reply.choices[0].text)
            metrics = httpx.get(f"{server.root}/metrics").text
    assert texts[0] == texts[1]
    assert value(metrics, "edgekit_speculative_proposed_tokens_total") > 0


@pytest.mark.parametrize("args, message", [
    (["--speculative", "mtp"], "error: "),  # the export has no MTP head: its path and what to do, below
    (["--speculative", "lookup"], "error: --speculative 'lookup' is not a proposer"),
    (["--speculative", "ngram", "--draft-tokens", "0"], "error: --draft-tokens 0 is outside 1..32"),
    (["--speculative", "ngram", "--draft-tokens", "33"], "error: --draft-tokens 33 is outside 1..32"),
    (["--speculative", "draft:/nope"], "error: --speculative draft:/nope: /nope is not an export or build "
                                       "(no edgekit.json)"),
    (["--draft-tokens", "3"], "error: --draft-tokens applies with --speculative"),
    (["--speculative", "mtp", "--draft-tokens", "3"], "error: --draft-tokens 3 with --speculative mtp: the MTP head "
                                                      "proposes one token a round"),
])
def test_bad_speculative_options_are_refused(exported, args, message):
    folder = exported("Qwen3ForCausalLM", "ort")
    result = edgekit("serve", str(folder), "--port", str(free_port()), *args)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(message), result.stderr
    if args[1:] == ["mtp"]:
        assert f"{folder} has no MTP head (its graph has no mtp_logits output)" in result.stderr
        assert "hint: export the Qwen3.5/3.6 checkpoint with its head: edgekit export MODEL -o DIR --mtp" in result.stderr
    assert "\nhint: " in result.stderr and "Traceback" not in result.stderr


def test_a_draft_model_serves_plain_decodings_tokens(exported):
    """``draft:PATH`` with the target's own export as the draft: greedy drafts are always kept."""
    from edgekit.serve.speculate import open_speculator

    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=2, max_context=128, threads=1)
    speculator = open_speculator(f"draft:{graph.path}", engine, 3, threads=1)
    scheduler = Scheduler(engine, speculator=speculator)
    jobs = [job(p) for p in PROMPTS[:2]]
    for item in jobs:
        scheduler.submit(item)
        step_until_done(scheduler)  # one at a time: each decodes alone
    expected = references(graph, PROMPTS[:2])
    assert [j.token_ids for j in jobs] == [expected[tuple(p)] for p in PROMPTS[:2]]
    proposed = counted(scheduler, "proposed")
    assert proposed > 0 and counted(scheduler, "accepted") == proposed
    speculator.close()
