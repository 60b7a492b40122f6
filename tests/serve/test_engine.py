"""The scheduler and engines without HTTP: batched rows equal batch-1 generation, fallbacks, text, metrics."""

from __future__ import annotations

import numpy as np
import pytest

from edgekit.generate import Sampling, generate
from edgekit.runtimes.registry import open_engine
from edgekit.serve.engine import BatchedEngine, SerialEngine, serving_engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.scheduler import Job, Scheduler, _held
from edgekit.types import ExportedGraph


def run_jobs(engine, prompts, max_tokens, tokenizer=None, stop=()):
    """Queue every prompt at once, step until all finish; returns the jobs."""
    scheduler = Scheduler(engine)
    jobs = [Job(p, n, Sampling(temperature=0), (), list(stop), tokenizer, lambda e: None)
            for p, n in zip(prompts, max_tokens)]
    for job in jobs:
        scheduler.submit(job)
    for _ in range(10_000):
        if not (scheduler.waiting or scheduler.active):
            break
        scheduler.step()
    return jobs, scheduler


@pytest.mark.parametrize("architecture", ["Qwen3ForCausalLM", "Qwen3_5ForCausalLM"])
def test_batched_rows_equal_batch_one_generation(exported, architecture):
    """Rows of different lengths join and leave mid-flight (4 rows, 7 jobs): every row is exact.
    Qwen3.5 mixes GQA layers with linear-attention (fixed-size state) layers."""
    graph = ExportedGraph.load(exported(architecture, "ort"))
    engine, reason = serving_engine(graph, max_batch=4, max_context=128, threads=1)
    assert isinstance(engine, BatchedEngine) and reason is None
    rng = np.random.default_rng(0)
    prompts = [[int(t) for t in rng.integers(1, 1000, size=3 + 4 * i)] for i in range(7)]
    max_tokens = [5 + 3 * (i % 4) for i in range(7)]
    jobs, scheduler = run_jobs(engine, prompts, max_tokens)
    assert scheduler.peak_active == 4
    for prompt, n, job in zip(prompts, max_tokens, jobs):
        expected = generate(open_engine(graph.path, threads=1), prompt, n).token_ids
        assert job.token_ids == expected and job.finish_reason == "length"


def test_portable_target_is_served_one_at_a_time(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "portable"))
    engine, reason = serving_engine(graph, max_batch=8, max_context=64, threads=1)
    assert isinstance(engine, SerialEngine) and "concatenates" in reason
    prompts = [[5, 6, 7], [8, 9]]
    jobs, _ = run_jobs(engine, prompts, [4, 4])
    for prompt, job in zip(prompts, jobs):
        assert job.token_ids == generate(open_engine(graph.path, threads=1), prompt, 4).token_ids


def test_cancelled_job_leaves_and_last_row_moves(exported):
    graph = ExportedGraph.load(exported("Qwen3ForCausalLM", "ort"))
    engine, _ = serving_engine(graph, max_batch=3, max_context=64, threads=1)
    scheduler = Scheduler(engine)
    prompts = [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    jobs = [Job(p, 10, Sampling(temperature=0), (), [], None, lambda e: None) for p in prompts]
    for job in jobs:
        scheduler.submit(job)
    scheduler.step()
    jobs[0].cancel()  # row 0 leaves; row 2 moves into it
    while scheduler.active:
        scheduler.step()
    assert jobs[0].finish_reason == "cancelled"
    for prompt, job in zip(prompts[1:], jobs[1:]):
        assert job.token_ids == generate(open_engine(graph.path, threads=1), prompt, 10).token_ids


def test_held_tail():
    assert _held("hello wor", ["world"]) == 3
    assert _held("hello", ["xyz"]) == 0
    assert _held("caf\ufffd", []) == 1


def test_metrics_text_format():
    metrics = Metrics()
    metrics.requests.inc(endpoint="/v1/completions", code="200")
    metrics.ttft.observe(0.003)
    metrics.queue_depth.set(2)
    text = metrics.render()
    assert 'edgekit_requests_total{code="200",endpoint="/v1/completions"} 1' in text
    assert 'edgekit_time_to_first_token_seconds_bucket{le="0.005"} 1' in text
    assert 'edgekit_time_to_first_token_seconds_bucket{le="+Inf"} 1' in text
    assert "edgekit_time_to_first_token_seconds_count 1" in text
    assert "# TYPE edgekit_queue_depth gauge" in text and "edgekit_queue_depth 2" in text


def test_cli_refuses_a_context_beyond_the_model(exported):
    from edgekit.cli.serve import serve
    from edgekit.errors import EdgekitError

    with pytest.raises(EdgekitError, match="--max-context"):
        serve(exported("Qwen3ForCausalLM", "ort"), host="127.0.0.1", port=8000, max_batch=4, max_context=10**7,
              api_key=None, threads=1, profile=None, model_id=None, prefix_cache_mb=0, prefill_batch=None,
              replicas=None, ray_address=None, autoscale=None, gpus_per_replica=0.0, speculative=None, draft_tokens=None)


def test_cli_binds_loopback_by_default():
    import inspect

    from edgekit.cli.serve import serve

    assert inspect.signature(serve).parameters["host"].default.default == "127.0.0.1"
