"""/metrics through prometheus_client (a registry per server), the request log line, and a graceful
shutdown on SIGTERM of a real ``edgekit serve`` process."""

from __future__ import annotations

import logging
import threading
import time

import httpx
import pytest

from tests.serve.conftest import API_KEY, ServeProcess

pytest.importorskip("prometheus_client")


def families(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels: str) -> float:
    for family in families(text).values():
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    raise AssertionError(f"{sample} {labels} not in the exposition")


def test_two_servers_in_one_process_keep_their_own_counts():
    from edgekit.serve.metrics import Counter, Metrics

    first, second = Metrics(), Metrics()
    first.requests.inc(endpoint="/v1/completions", code="200")
    first.requests.inc(endpoint="/v1/completions", code="200")
    second.generation_tokens.inc(5)
    first.extra = Counter("edgekit_test_things_total", "A metric a module adds later.")
    first.extra.inc(3)
    a, b = first.render(), second.render()
    assert value(a, "edgekit_requests_total", endpoint="/v1/completions", code="200") == 2
    assert value(a, "edgekit_generation_tokens_total") == 0 and value(b, "edgekit_generation_tokens_total") == 5
    assert value(a, "edgekit_test_things_total") == 3 and "edgekit_test_things_total" not in b
    assert "_created" not in a  # no timestamp series doubling the exposition


def test_live_metrics_parse_and_count_the_work(live):
    client = live.client()
    before = httpx.get(f"{live.root}/metrics", timeout=10).text
    out = client.completions.create(model="m", prompt="def f():", max_tokens=4, temperature=0)
    after = httpx.get(f"{live.root}/metrics", timeout=10).text
    kinds = {name: f.type for name, f in families(after).items()}
    assert kinds["edgekit_requests"] == "counter" and kinds["edgekit_time_to_first_token_seconds"] == "histogram"
    assert kinds["edgekit_queue_depth"] == "gauge"
    grown = value(after, "edgekit_generation_tokens_total") - value(before, "edgekit_generation_tokens_total")
    assert grown == out.usage.completion_tokens
    assert value(after, "edgekit_prompt_tokens_total") - value(before, "edgekit_prompt_tokens_total") \
        == out.usage.prompt_tokens
    ok = value(after, "edgekit_requests_total", endpoint="/v1/completions", code="200")
    assert ok >= 1 and value(after, "edgekit_time_to_first_token_seconds_count") >= 1


def test_each_request_logs_one_info_line(live, caplog):
    client = live.client()
    with caplog.at_level(logging.INFO, logger="edgekit.serve.requests"):
        out = client.completions.create(model="m", prompt="x = 1", max_tokens=3, temperature=0)
        list(client.completions.create(model="m", prompt="y", max_tokens=2, temperature=0, stream=True))
        deadline = time.monotonic() + 5
        while len(caplog.records) < 2 and time.monotonic() < deadline:  # the stream's line follows its end
            time.sleep(0.05)
    lines = [r.getMessage() for r in caplog.records if r.name == "edgekit.serve.requests"]
    assert len(lines) == 2, lines
    assert lines[0].startswith(out.id + ": ")
    assert f"{out.usage.prompt_tokens} tokens in, {out.usage.completion_tokens} out, ttft " in lines[0]
    assert lines[0].endswith(" ms, " + out.choices[0].finish_reason)


def _stream_lines(url: str, body: dict, sink: list, first: threading.Event) -> None:
    try:
        with httpx.stream("POST", f"{url}/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as response:
            for line in response.iter_lines():
                if line:
                    sink.append(line)
                    first.set()
    except httpx.HTTPError as exc:  # the server closed the stream at the end of its grace period
        sink.append(f"closed: {type(exc).__name__}")
    finally:
        first.set()


@pytest.mark.parametrize("grace, finished", [(30, True), (0.2, False)], ids=["finishes", "cancels"])
def test_sigterm_lets_in_flight_requests_finish_within_the_grace(tiny_export, tmp_path, grace, finished):
    """A real ``edgekit serve``: SIGTERM mid-stream; the stream ends ([DONE]) if it can within the grace
    (EDGEKIT_SHUTDOWN_GRACE_S), else it is cancelled; either way the process exits 0, promptly."""
    env = {"EDGEKIT_LOG_LEVEL": "info", "EDGEKIT_SHUTDOWN_GRACE_S": str(grace)}
    server = ServeProcess(tiny_export, tmp_path, "--api-key", API_KEY, "--max-context", "1024", env=env).wait_ready()
    lines: list[str] = []
    started = threading.Event()
    # 8 greedy choices of 1000 tokens (no end of text before that on this model): seconds of work
    body = {"prompt": "a", "max_tokens": 1000, "n": 8, "temperature": 0, "stream": True}
    stream = threading.Thread(target=_stream_lines, args=(server.url, body, lines, started))
    stream.start()
    assert started.wait(60)
    signalled = time.monotonic()
    code = server.stop(timeout=60)
    took = time.monotonic() - signalled
    stream.join(10)
    log = server.log.read_text()
    assert code == 0, log
    assert (lines[-1] == "data: [DONE]") == finished, lines[-3:]
    if not finished:
        assert took < grace + 10, f"shutdown took {took:.1f} s"  # the grace, plus the scheduler's stop
        assert "timeout graceful shutdown exceeded" in log
    assert "tokens in" in log and "Traceback" not in log, log
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{server.port}/health", timeout=2)
