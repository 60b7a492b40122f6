"""lm-evaluation-harness (``--model local-completions``) end to end against ``edgekit serve`` on the trained
``tiny-code`` preset: a multiple-choice (loglikelihood) task whose log-likelihoods equal edgekit's own
teacher-forced ones to 1e-4, and a generate_until task whose answers equal ``generate``'s, on local data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.serve.conftest import ServeProcess

lm_eval = pytest.importorskip("lm_eval")

DATA = Path(__file__).parent / "data"
REPO = Path(__file__).parents[2]


@pytest.fixture(scope="module")
def served(tiny_code_export, tmp_path_factory):
    server = ServeProcess(tiny_code_export, tmp_path_factory.mktemp("lm-eval"), "--max-batch", "4",
                          "--max-context", "512").wait_ready()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def evaluated(served, tiny_code_export, tmp_path_factory):
    """Both tasks through lm-eval's own client, requests batched (lists of token-id prompts)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(REPO)  # the task YAMLs name their jsonl relative to the repository
        patch.setenv("HF_DATASETS_CACHE", str(tmp_path_factory.mktemp("datasets")))
        patch.setenv("HF_DATASETS_OFFLINE", "1")
        args = {"model": "tiny-code", "base_url": f"{served.url}/completions", "tokenizer": str(tiny_code_export),
                "tokenizer_backend": "huggingface", "num_concurrent": 2, "max_retries": 1, "max_length": 512}
        tasks = TaskManager(include_path=str(DATA), include_defaults=False)  # indexing lm-eval's own takes ~1 min
        names = ["edgekit_tiny_mc", "edgekit_tiny_gen"]
        return simple_evaluate(model="local-completions", model_args=args, tasks=names,
                               task_manager=tasks, batch_size=3, bootstrap_iters=0, log_samples=True)


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into ids: trailing spaces move to the continuation."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = tokenizer.encode(context + continuation)
    head = tokenizer.encode(context)
    return head, whole[len(head):]


def _teacher_forced(session, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    session.reset(len(ids))
    logits = session.forward(ids).astype(np.float64)  # (S, vocab)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    return float(sum(logp[len(context) - 1 + i, t] for i, t in enumerate(continuation)))


def _args(sample: dict) -> list[tuple]:
    """Each request's arguments, as lm-eval logs them (a list of tuples, or a dict of numbered args)."""
    args = sample["arguments"]
    if isinstance(args, dict):
        return [tuple(a.values()) for a in args.values()]
    return [tuple(a) for a in args]


def test_multiple_choice_loglikelihoods_equal_teacher_forced(evaluated, tiny_code_export):
    from edgekit.runtimes.registry import open_engine
    from edgekit.tokenizer import load_tokenizer
    from edgekit.types import ExportedGraph

    tokenizer = load_tokenizer(ExportedGraph.load(tiny_code_export), required=True)
    session = open_engine(tiny_code_export, threads=1)
    samples = evaluated["samples"]["edgekit_tiny_mc"]
    assert len(samples) == 4
    compared = 0
    for sample in samples:
        for (context, continuation), response in zip(_args(sample), sample["resps"]):
            served_ll = float(response[0][0])
            head, tail = _encode_pair(tokenizer, context, continuation)
            assert served_ll == pytest.approx(_teacher_forced(session, head, tail), abs=1e-4), (context, continuation)
            compared += 1
    assert compared == 12
    accuracy = evaluated["results"]["edgekit_tiny_mc"]["acc,none"]
    assert 0 <= accuracy <= 1


def test_generate_until_answers_equal_generate(evaluated, tiny_code_export):
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine
    from edgekit.tokenizer import load_tokenizer
    from edgekit.types import ExportedGraph

    graph = ExportedGraph.load(tiny_code_export)
    tokenizer = load_tokenizer(graph, required=True)
    session = open_engine(tiny_code_export, threads=1)
    samples = evaluated["samples"]["edgekit_tiny_gen"]
    assert len(samples) == 3
    for sample in samples:
        context = _args(sample)[0][0]
        ids = generate(session, tokenizer.encode(context), 12, eos_ids=graph.model.eos_token_ids).token_ids
        expected = tokenizer.decode(ids).split("\n")[0]
        assert sample["resps"][0][0] == expected, context
    assert "exact_match,none" in evaluated["results"]["edgekit_tiny_gen"]
