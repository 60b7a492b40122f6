"""edgekit serve through the official ``openai`` client: completions, chat, streaming, batching, errors."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import API_KEY, LiveServer

GREEDY = {"temperature": 0, "extra_body": {"return_token_ids": True}}


def reference(folder, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """What ``generate`` returns for this prompt alone on a fresh batch-1 session."""
    from edgekit.generate import generate
    from edgekit.runtimes.registry import open_engine

    session = open_engine(folder, threads=1)
    return generate(session, prompt_ids, max_tokens, eos_ids=session.graph.model.eos_token_ids).token_ids


def tokenizer(live):
    return live.app.state.server.tokenizer


def test_models_health_metrics(live):
    models = live.client().models.list()
    assert [m.id for m in models.data] == [live.app.state.server.model_id]
    health = httpx.get(f"{live.root}/health", timeout=10).json()
    assert health["status"] == "ok" and health["batching"] and health["max_batch"] == 8
    text = httpx.get(f"{live.root}/metrics", timeout=10).text
    for name in ("edgekit_requests_total", "edgekit_time_to_first_token_seconds_bucket", "edgekit_queue_depth",
                 "edgekit_time_per_output_token_seconds_count", "edgekit_generation_tokens_total"):
        assert name in text


def test_completion_matches_generate(live, tiny_export):
    out = live.client().completions.create(model="any", prompt="def main():", max_tokens=12, **GREEDY)
    ids = tokenizer(live).encode("def main():")
    expected = reference(tiny_export, ids, 12)
    choice = out.choices[0]
    assert choice.model_extra["token_ids"] == expected
    assert choice.text == tokenizer(live).decode(expected)
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)
    assert choice.finish_reason in ("length", "stop")


def test_streaming_completion_equals_non_streaming(live):
    client = live.client()
    whole = client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0)
    chunks = list(client.completions.create(model="m", prompt="Once upon a time", max_tokens=10, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_chat_stream_and_non_stream(live):
    client = live.client()
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    assert whole.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.usage.prompt_tokens > 2  # the template wrapped the messages


def test_sse_ends_with_done(live):
    body = {"prompt": "a b c", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{live.url}/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_stop_string_truncates(live):
    client = live.client()
    full = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), f"greedy text {full!r} too short to pick a stop string"
    cut = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert cut.choices[0].text == full[: full.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="m", prompt="Hello", max_tokens=12, temperature=0, stop=stop,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seeded_sampling_is_reproducible(live):
    client = live.client()
    args = {"model": "m", "prompt": "The sky", "max_tokens": 8, "temperature": 0.9, "top_p": 0.9, "seed": 7}
    assert client.completions.create(**args).choices[0].text == client.completions.create(**args).choices[0].text


def test_16_concurrent_greedy_requests_match_generate_alone(live, tiny_export):
    prompts = [f"Request number {i}: " + "word " * (i % 5) for i in range(16)]
    tok = tokenizer(live)
    client = live.client()

    def ask(i):
        max_tokens = 8 + i % 7  # rows leave at different steps
        out = client.completions.create(model="m", prompt=prompts[i], max_tokens=max_tokens, **GREEDY)
        return out.choices[0], max_tokens

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(ask, range(16), timeout=240))
    assert live.scheduler.peak_active > 1  # they really were batched
    for i, (choice, max_tokens) in enumerate(results):
        expected = reference(tiny_export, tok.encode(prompts[i]), max_tokens)
        assert choice.model_extra["token_ids"] == expected, f"prompt {i}"
        assert choice.text == tok.decode(expected)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b'{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
    (b'{"prompt": "x", "max_tokens": -3}', "max_tokens"),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "max_tokens": 10000}', "prompt"),
    (b'{"max_tokens": 4}', "prompt"),
])
def test_bad_requests_get_400_and_serving_continues(live, body, param):
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{live.url}/completions", content=body, headers=headers, timeout=10)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert live.client().completions.create(model="m", prompt="ok", max_tokens=2).choices[0].text is not None


def test_bad_chat_messages_400(live):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    response = httpx.post(f"{live.url}/chat/completions", json={"messages": [{"role": "wizard", "content": "x"}]},
                          headers=headers, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"].startswith("messages")


def test_unauthorized_get_401(live):
    import openai

    for headers in ({}, {"Authorization": "Bearer wrong"}):
        response = httpx.post(f"{live.url}/completions", json={"prompt": "x"}, headers=headers, timeout=10)
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        live.client(key="wrong").models.list()
    assert live.client().completions.create(model="m", prompt="still here", max_tokens=2).choices


def test_dropped_stream_frees_its_row_and_others_finish(live):
    client = live.client()
    stream = client.completions.create(model="m", prompt="long story", max_tokens=200, temperature=0, stream=True)
    next(iter(stream))
    done = []
    other = threading.Thread(target=lambda: done.append(
        client.completions.create(model="m", prompt="short", max_tokens=6, temperature=0)))
    other.start()
    stream.close()  # the client goes away mid-stream
    other.join(timeout=60)
    assert done and done[0].choices[0].text is not None
    deadline = time.monotonic() + 10
    while live.scheduler.active or live.scheduler.waiting:
        assert time.monotonic() < deadline, "the dropped stream still holds a row"
        time.sleep(0.05)


def test_serial_fallback_serves_fifo(tiny_export):
    """max_batch 1 takes the serial engine (as the portable target and hybrid models do)."""
    with LiveServer(tiny_export, max_batch=1, max_context=128, threads=1) as server:
        assert server.app.state.server.serial_reason is None
        client = server.client()
        prompts = ["alpha", "beta gamma", "delta epsilon zeta"]
        with ThreadPoolExecutor(3) as pool:
            outs = list(pool.map(lambda p: client.completions.create(model="m", prompt=p, max_tokens=6, **GREEDY),
                                 prompts, timeout=120))
        tok = server.app.state.server.tokenizer
        for prompt, out in zip(prompts, outs):
            assert out.choices[0].model_extra["token_ids"] == reference(tiny_export, tok.encode(prompt), 6)


def test_server_imports_neither_torch_nor_transformers(tiny_export):
    code = (
        "import sys\n"
        "from edgekit.cli import serve\n"
        "from edgekit.serve.app import create_app\n"
        f"app = create_app({str(tiny_export)!r})\n"
        "bad = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
