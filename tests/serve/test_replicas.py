"""``edgekit serve --replicas``: the same app as Ray Serve replicas on a local Ray instance.

Checked through the official ``openai`` client: 8 concurrent greedy requests equal what
``generate`` gives on the same export, and both replicas answered (their ``x-edgekit-replica``
headers and each replica's ``/metrics`` samples, labelled ``replica="ID"``).
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray.serve")

from tests.serve.conftest import free_port  # noqa: E402
from tests.serve.test_server import reference  # noqa: E402
from tests.sweep.ray_local import ray_local  # noqa: E402,F401  (a fixture)

CLI = [sys.executable, "-c", "from edgekit.cli import main; main()"]
PROMPTS = [f"def f{i}(x):" for i in range(8)]


@pytest.fixture(scope="module")
def replicas(ray_local, tiny_export):  # noqa: F811  (the fixture imported above)
    """Two replicas of the tiny export behind Ray Serve's proxy on a free port; yields its root URL."""
    from ray import serve

    from edgekit.serve.app import ServeConfig
    from edgekit.serve.replicas import APP_NAME, ReplicaOptions, start_replicas

    port = free_port()
    start_replicas(tiny_export, ServeConfig(max_batch=4, max_context=128, threads=1), ReplicaOptions(replicas=2),
                   "127.0.0.1", port, timeout_s=180)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete(APP_NAME)
        serve.shutdown()


def _client(root: str):
    import openai

    return openai.OpenAI(base_url=f"{root}/v1", api_key="unused", timeout=60, max_retries=0)


def test_concurrent_greedy_requests_equal_generate_and_spread_over_both_replicas(replicas, tiny_export):
    client = _client(replicas)

    def complete(prompt: str):
        raw = client.completions.with_raw_response.create(model="any", prompt=prompt, max_tokens=8, temperature=0,
                                                          extra_body={"return_token_ids": True})
        return raw.headers["x-edgekit-replica"], raw.parse()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, PROMPTS))
    from edgekit.tokenizer import load_tokenizer
    from edgekit.types import ExportedGraph

    tokenizer = load_tokenizer(ExportedGraph.load(tiny_export))
    for prompt, (_, out) in zip(PROMPTS, answers):
        assert out.choices[0].model_extra["token_ids"] == reference(tiny_export, tokenizer.encode(prompt), 8)
    served = [replica for replica, _ in answers]
    assert len(set(served)) == 2, served
    counted = _completions_per_replica(replicas)
    assert counted == {r: served.count(r) for r in set(served)}


def _completions_per_replica(root: str) -> dict[str, int]:
    """Each replica's own count of /v1/completions answered 200, read from its /metrics."""
    pattern = re.compile(r'^edgekit_requests_total\{replica="(\w+)",(?=[^}]*endpoint="/v1/completions")'
                         r'(?=[^}]*code="200")[^}]*\} (\d+(?:\.\d+)?)$', re.M)
    counts: dict[str, int] = {}
    for _ in range(40):  # the router picks the replica: ask until both have answered
        text = httpx.get(f"{root}/metrics", timeout=10).text
        for replica, value in pattern.findall(text):
            counts[replica] = int(float(value))
        if len(counts) == 2:
            break
    return counts


def test_streaming_chat_and_health_through_the_router(replicas):
    client = _client(replicas)
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=0, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    health = httpx.get(f"{replicas}/health", timeout=10)
    assert health.json()["status"] == "ok" and health.headers["x-edgekit-replica"]


def test_metrics_get_the_replica_label():
    from edgekit.serve.replicas import label_metrics

    text = '# TYPE a counter\na_total{code="200",endpoint="/x"} 3\nb 1.5\n'
    assert label_metrics(text, "r1") == '# TYPE a counter\na_total{replica="r1",code="200",endpoint="/x"} 3\nb{replica="r1"} 1.5\n'


def test_autoscale_maps_to_ray_serve_on_ongoing_requests():
    from ray import serve

    from edgekit.serve.app import ServeConfig
    from edgekit.serve.replicas import EdgekitReplica, ReplicaOptions, deployment_options

    options = deployment_options(ServeConfig(max_batch=6), ReplicaOptions(replicas=9, autoscale=(1, 4), gpus=1))
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 4,
                                             "target_ongoing_requests": 6}
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1} and "num_replicas" not in options
    serve.deployment(EdgekitReplica, **options)  # Ray Serve accepts them as they are
    fixed = deployment_options(ServeConfig(max_batch=6), ReplicaOptions(replicas=3))
    assert fixed["num_replicas"] == 3 and fixed["max_ongoing_requests"] == 12


def _edgekit(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=120)


def test_bad_replica_options_fail_before_ray_starts(tiny_export):
    zero = _edgekit("serve", str(tiny_export), "--replicas", "0")
    assert zero.returncode == 1 and "error: --replicas 0 must be >= 1" in zero.stderr
    backwards = _edgekit("serve", str(tiny_export), "--autoscale", "3:1")
    assert backwards.returncode == 1 and "error: --autoscale 3:1 is not MIN:MAX" in backwards.stderr
    assert "hint: e.g. --autoscale 1:4" in backwards.stderr and "starting" not in backwards.stderr
