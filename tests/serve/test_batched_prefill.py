"""Batched prefill: prompts that join in one step share forwards, and give what serial prefill gives."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.generate import Sampling, generate
from edgekit.runtimes.registry import open_engine
from edgekit.serve.engine import BatchedEngine, serving_engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.prefill import _groups, _Row
from edgekit.serve.prefix_cache import Hit
from edgekit.serve.scheduler import Job, Scheduler
from edgekit.types import ExportedGraph


def run_all(engine, prompts, max_tokens):
    """Submit every prompt before the first step (so they join together); step until all finish."""
    scheduler = Scheduler(engine, Metrics())
    jobs = [Job(p, max_tokens, Sampling(temperature=0), (), [], None, lambda e: None) for p in prompts]
    for job in jobs:
        scheduler.submit(job)
    while scheduler.waiting or scheduler.active:
        scheduler.step()
    return jobs, scheduler


def prompts_of(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, 1000, size=n)] for n in lengths]


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_batched_prefill_equals_batch_one_generation(exported, architecture):
    """Six prompts join at once (lengths chosen so that groups form: near-equal ones batch, the odd
    one runs alone); every row then generates what batch-1 ``generate`` does. Qwen3 right-pads a
    group; Qwen3.5 (linear-attention states) cuts a group to its shortest prompt."""
    graph = ExportedGraph.load(exported(architecture, "ort"))
    engine, _ = serving_engine(graph, max_batch=6, max_context=128, threads=1, prefix_cache_bytes=0)
    assert engine.pad_prompts == (architecture == "Qwen3ForCausalLM")
    prompts = prompts_of([17, 16, 16, 15, 4, 30])
    jobs, scheduler = run_all(engine, prompts, 6)
    batched = scheduler.metrics.render()
    assert scheduler.peak_active == 6
    assert 'edgekit_prefill_batch_size_bucket{le="1.0"}' in batched
    assert _count(batched, 'le="4.0"') > _count(batched, 'le="1.0"')  # a forward of 2..4 prompts ran
    for prompt, job in zip(prompts, jobs):
        assert job.token_ids == generate(open_engine(graph.path, threads=1), prompt, 6).token_ids


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_prefill_rows_logits_equal_serial_prefill(exported, architecture):
    """The rows' logits equal a batch-1 session's, and keep_all returns every position's."""
    graph = ExportedGraph.load(exported(architecture, "ort"))
    engine = BatchedEngine(open_engine(graph.path, threads=1), max_batch=4, max_context=64)
    prompts = prompts_of([9, 12, 11, 12], seed=1)
    done = engine.prefill_rows(0, prompts)
    assert sorted(done.rows) == [0, 1, 2, 3] and max(done.batches) > 1 and done.cached == [0] * 4
    for prompt, logits in zip(prompts, done.logits):
        np.testing.assert_allclose(logits, open_engine(graph.path, threads=1).forward(prompt)[-1], atol=1e-5)
    every = engine.prefill(1, prompts[0], keep_all=True)
    np.testing.assert_allclose(every, open_engine(graph.path, threads=1).forward(prompts[0]), atol=1e-5)


def test_prefill_batch_one_runs_one_prompt_per_forward(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=4, max_context=64, threads=1, prefill_batch=1)
    _, scheduler = run_all(engine, prompts_of([8, 8, 8]), 2)
    text = scheduler.metrics.render()
    assert _count(text, 'le="1.0"') == _count(text, 'le="+Inf"') == 3


class _Plan:
    """The engine attributes ``_groups`` reads."""

    def __init__(self, pad, batch=8, cache=None, stateful=False):
        self.pad_prompts, self.prefill_batch, self.prefix_cache, self.stateful = pad, batch, cache, stateful


def _plan(lengths, **kw):
    rows = [_Row(list(range(n)), i, Hit(), False) for i, n in enumerate(lengths)]
    return [([r.row for r in group], widths) for group, widths in _groups(_Plan(**kw), rows)]


def test_groups_keep_three_quarters_useful_work():
    # padded: 100, 90, 80 fill 90 % of 3 x 100; 20 would drop it to 72 %: alone
    assert _plan([100, 90, 80, 20], pad=True) == [([0, 1, 2], [100, 90, 80])]
    # cut to the shortest: 100, 90 batch 180 of 190 tokens; with 80, 240 of 270 (89 %); 20 is alone
    assert _plan([100, 90, 80, 20], pad=False) == [([0, 1, 2], [80, 80, 80])]
    assert _plan([50, 10], pad=True) == [] and _plan([50, 10], pad=False) == []
    assert _plan([8] * 5, pad=True, batch=2) == [([0, 1], [8, 8]), ([2, 3], [8, 8])]
    assert _plan([3000, 3000], pad=True) == []  # 6000 tokens of (B, S, vocab) logits in one forward: too many


def _count(text: str, bucket: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith("edgekit_prefill_batch_size_bucket{" + bucket))
    return float(line.split()[-1])


def test_a_failing_prompt_fails_alone(exported):
    """A prompt the engine rejects (longer than its rows) fails its batch; the retry one at a time
    fails that prompt alone and the others generate as usual."""
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=3, max_context=32, threads=1)
    prompts = prompts_of([10, 40, 12], seed=2)
    events = {i: [] for i in range(3)}
    scheduler = Scheduler(engine, Metrics())
    jobs = [Job(p, 4, Sampling(temperature=0), (), [], None, events[i].append) for i, p in enumerate(prompts)]
    for job in jobs:
        scheduler.submit(job)
    while scheduler.waiting or scheduler.active:
        scheduler.step()
    assert jobs[1].finish_reason == "error" and events[1][-1].error
    for i in (0, 2):
        assert jobs[i].token_ids == generate(open_engine(graph.path, threads=1), prompts[i], 4).token_ids


@pytest.fixture(scope="module")
def cpu_build(exported, tmp_path_factory):
    """A CPU build of the tiny Qwen3 (fp32): its graph takes logits_to_keep."""
    from edgekit.engines import build_engine

    out = tmp_path_factory.mktemp("serve-build") / "qwen3-fp32"
    build_engine(exported("Qwen3ForCausalLM", "ort"), "cpu-x86-64", out, quant=None, precision="fp32")
    return out


def test_a_build_computes_only_the_logits_a_prefill_needs(cpu_build):
    """On a build (logits_to_keep), padded group and single-row prefills get the last positions'
    logits only, and every row's logits still equal a batch-1 session's; keep_all gets them all."""
    session = open_engine(cpu_build, threads=1)
    engine = BatchedEngine(session, max_batch=4, max_context=64)
    assert engine.keeps_logits
    assert engine.forward(0, [[5, 6, 7], [8, 9]], [0, 0], keep=2).shape == (2, 2, session.graph.model.vocab_size)
    prompts = prompts_of([12, 9, 12, 11], seed=2)
    done = engine.prefill_rows(0, prompts)
    assert max(done.batches) > 1
    reference = open_engine(cpu_build, threads=1)
    for prompt, logits in zip(prompts, done.logits):
        reference.reset(len(prompt))
        np.testing.assert_allclose(logits, reference.last_logits(prompt), atol=1e-4)
    everything = engine.prefill_rows(0, prompts[:1], keep_all=[True]).logits[0]
    reference.reset(len(prompts[0]))
    assert everything.shape == (12, reference.graph.model.vocab_size)
    np.testing.assert_allclose(everything, reference.forward(prompts[0]), atol=1e-4)
    jobs, _ = run_all(BatchedEngine(open_engine(cpu_build, threads=1), 4, 64), prompts, 5)
    for prompt, job in zip(prompts, jobs):
        assert job.token_ids == generate(open_engine(cpu_build, threads=1), prompt, 5).token_ids
