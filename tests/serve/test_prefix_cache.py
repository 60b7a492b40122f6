"""The prefix cache: identical greedy outputs with it on and off (tiny Qwen3, tiny Qwen3.5 hybrid),
the tokens it restores, its LRU byte budget, and its /metrics."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.generate import Sampling
from edgekit.runtimes.registry import open_engine
from edgekit.serve.engine import BatchedEngine
from edgekit.serve.metrics import Metrics
from edgekit.serve.prefix_cache import PrefixCache
from edgekit.serve.scheduler import Job, Scheduler
from edgekit.tokenizer import load_tokenizer
from edgekit.types import ExportedGraph

BLOCK = 16  # small blocks: short test prompts still span several


@pytest.fixture(scope="module", params=["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def graph(request, exported):
    """Tiny Qwen3 (attention only) and Qwen3.5 (hybrid), the exports the other serve tests share."""
    return ExportedGraph.load(exported(request.param, "ort"))


@pytest.fixture(scope="module")
def qwen3(exported):
    return ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))


def engine_for(graph, cache_bytes, max_batch=4):
    return BatchedEngine(open_engine(graph.path, threads=1), max_batch, 256, cache_bytes, prefix_block=BLOCK)


def waves(engine, waves_of_prompts, max_tokens=8):
    """Run each wave of prompts to the end before the next (so later waves can hit the cache)."""
    scheduler = Scheduler(engine, Metrics())
    done = []
    for prompts in waves_of_prompts:
        jobs = [Job(p, max_tokens, Sampling(temperature=0), (), [], None, lambda e: None) for p in prompts]
        for job in jobs:
            scheduler.submit(job)
        while scheduler.waiting or scheduler.active:
            scheduler.step()
        done.append(jobs)
    return done, scheduler


def chat_waves(graph):
    """A shared system prompt with different questions; a repeated prompt; a growing conversation."""
    tokenizer = load_tokenizer(graph)
    system = tokenizer.encode("You are a careful Python reviewer. Answer with code only, no prose.\n" * 2)
    ask = [tokenizer.encode(f"def f{i}(x):\n    return x * {i}\n") for i in range(3)]
    first = [system + ask[0], system + ask[1]]
    return system, [first, [system + ask[2], first[0], first[1] + ask[2]]]


def test_outputs_identical_with_cache_on_and_off(graph):
    system, prompts = chat_waves(graph)
    (off_1, off_2), _ = waves(engine_for(graph, 0), prompts)
    (on_1, on_2), scheduler = waves(engine_for(graph, 64 << 20), prompts)
    for off, on in zip(off_1 + off_2, on_1 + on_2):
        assert on.token_ids == off.token_ids and on.finish_reason == off.finish_reason == "length"
    assert [j.cached_tokens for j in on_1] == [0, 0]
    shared = len(system) // BLOCK * BLOCK  # a model with states resumes at block ends only
    assert on_2[0].cached_tokens >= shared > 0
    assert on_2[1].cached_tokens == len(prompts[1][1])  # the same prompt again: no forward at all
    assert on_2[2].cached_tokens == len(prompts[0][1])  # the earlier prompt's end (its tail)
    hits = sum(j.cached_tokens for j in on_2)
    assert f"edgekit_prefix_cache_hit_tokens_total {hits:.1f}" in scheduler.metrics.render()


def test_growing_chat_resumes_after_the_previous_reply(graph):
    """A finished row leaves its prompt and reply in the cache (models with states: snapshot at block
    ends while decoding, and at the end); the next turn starts with both and restores all of them."""
    system, ((turn_1, _), _) = chat_waves(graph)
    (off,), _ = waves(engine_for(graph, 0), [[turn_1]], max_tokens=20)
    turn_2 = turn_1 + off[0].token_ids + [7, 8, 9]
    (_, (off_2,)), _ = waves(engine_for(graph, 0), [[turn_1], [turn_2]], max_tokens=20)
    (on_1, (on_2,)), _ = waves(engine_for(graph, 64 << 20), [[turn_1], [turn_2]], max_tokens=20)
    assert on_1[0].token_ids == off[0].token_ids and on_2.token_ids == off_2.token_ids
    assert on_2.cached_tokens == len(turn_1) + 20 - 1  # the reply's last token never entered the cache


def test_cache_logits_match_a_fresh_prefill(graph):
    """A prompt resumed from a cached prefix gives the logits of a full prefill (1e-4)."""
    system, (first, _) = chat_waves(graph)
    engine = engine_for(graph, 64 << 20)
    engine.prefill(0, first[0])
    prompt = first[1] + [5, 6, 7]
    done = engine.prefill_rows(1, [prompt])
    assert done.cached[0] >= len(system) // BLOCK * BLOCK
    np.testing.assert_allclose(done.logits[0], open_engine(graph.path, threads=1).forward(prompt)[-1], atol=1e-4)


def test_keep_all_skips_the_cache(qwen3):
    engine = engine_for(qwen3, 64 << 20)
    prompt = list(range(1, 40))
    engine.prefill(0, prompt)
    every = engine.prefill(1, prompt, keep_all=True)  # echo + logprobs: logits at every position
    assert every.shape == (len(prompt), qwen3.model.vocab_size)
    np.testing.assert_allclose(every, open_engine(qwen3.path, threads=1).forward(prompt), atol=1e-5)


def test_echo_job_scores_every_prompt_token_with_the_cache_on(qwen3):
    """An echo job (prompt logprobs) runs its own full prefill even when its whole prompt is cached."""
    prompt = list(range(1, 40))
    engine = engine_for(qwen3, 64 << 20)
    scheduler = Scheduler(engine, Metrics())
    for job in [Job(prompt, 2, Sampling(temperature=0), (), [], None, lambda e: None),
                Job(prompt, 2, Sampling(temperature=0), (), [], None, lambda e: None, logprobs=1, echo=True)]:
        scheduler.submit(job)
        while scheduler.waiting or scheduler.active:
            scheduler.step()
    assert job.cached_tokens == 0 and len(job.prompt_logprobs) == len(prompt) and job.prompt_logprobs[0] is None


def test_lru_stays_within_its_budget_and_evicts_leaves_first():
    kv = lambda s, e: [np.zeros((2, e - s, 8), np.float32)]  # noqa: E731  64 bytes per position
    cache = PrefixCache(budget=4 * 16 * 64, block=16, metrics=Metrics())  # room for 4 blocks
    a, b = list(range(48)), list(range(100, 132))
    cache.insert(a, kv, {}, None)  # 3 blocks
    cache.insert(b, kv, {}, None)  # 2 more: the oldest leaf, a's third block, goes
    assert cache.nbytes <= cache.budget and len(cache.entries) == 4 and cache.evictions == 1
    assert cache.lookup(a + [7]).length == 32  # a's first two blocks are still there
    assert cache.lookup(b + [7]).length == 32
    text = cache.metrics.render()
    assert "edgekit_prefix_cache_evictions_total 1.0" in text and "edgekit_prefix_cache_entries 4.0" in text
    assert f"edgekit_prefix_cache_bytes {float(cache.nbytes)}" in text


def test_states_resume_only_where_a_snapshot_was_taken():
    kv = lambda s, e: []  # noqa: E731
    state = [np.ones(4, np.float32)]
    hybrid = PrefixCache(budget=1 << 20, block=4, anywhere=False)
    hybrid.insert(list(range(10)), kv, {4: state, 8: state, 10: state}, np.zeros(3, np.float32))
    assert hybrid.lookup(list(range(7)) + [99]).length == 4  # 7 tokens shared, last snapshot at 4
    assert hybrid.lookup(list(range(10)) + [99]).length == 10  # the prompt's end (a tail entry)
    assert hybrid.lookup(list(range(10))).logits is not None  # the same prompt: its logits are cached
    assert hybrid.lookup(list(range(8))).length == 4  # 8 is the whole prompt and has no logits: back off
    attention = PrefixCache(budget=1 << 20, block=4, anywhere=True)
    attention.insert(list(range(10)), lambda s, e: [np.zeros((1, e - s, 2), np.float32)], {}, None)
    assert attention.lookup(list(range(7)) + [99]).length == 7  # keys/values are per position
    assert attention.lookup(list(range(8))).length == 7  # one token left to compute the logits


def test_server_reports_the_cache_on_metrics(tiny_export):
    """Through HTTP: --prefix-cache-mb reaches the engine; a second prompt sharing the first one's
    tokens restores them, and /metrics counts them."""
    import httpx

    from tests.serve.conftest import LiveServer

    first = list(range(10, 50))
    with LiveServer(tiny_export, max_batch=2, max_context=128, threads=1, prefix_cache_mb=16) as server:
        for prompt in (first, first + [60, 61]):
            body = {"prompt": prompt, "max_tokens": 2, "temperature": 0}
            assert httpx.post(f"{server.url}/completions", json=body, timeout=60).status_code == 200
        text = httpx.get(f"{server.root}/metrics", timeout=10).text
    hits = next(line for line in text.splitlines() if line.startswith("edgekit_prefix_cache_hit_tokens_total "))
    assert float(hits.split()[-1]) >= len(first)
    assert "edgekit_prefill_batch_size_count" in text


@pytest.mark.parametrize("option, value", [("--prefix-cache-mb", "-1"), ("--prefill-batch", "0")])
def test_cli_refuses_a_bad_cache_or_prefill_option(tiny_export, option, value):
    import subprocess
    import sys

    from tests.serve.conftest import free_port

    cli = [sys.executable, "-c", "from edgekit.cli import main; main()"]
    result = subprocess.run([*cli, "serve", str(tiny_export), "--port", str(free_port()), "--threads", "1",
                             option, value], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stderr
    assert f"error: {option} {value} must be >= " in result.stderr and "hint: " in result.stderr
    assert "Traceback" not in result.stderr and "serving" not in result.stdout + result.stderr
