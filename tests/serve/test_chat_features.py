"""Chat through the official ``openai`` client: logprobs, n, tool calls (the model's own template,
streamed and not), response_format enforced by grammar; every generated JSON validates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.serve.conftest import API_KEY, LiveServer
from tests.serve.test_completions_legacy import teacher_forced

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

DATA = Path(__file__).parent / "data"
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "days", "metric", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 6}, "days": {"type": "integer", "minimum": 1,
                         "maximum": 7}, "metric": {"type": "boolean"}, "unit": {"enum": ["C", "F"]}}}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather for a city.",
                                            "parameters": SCHEMA}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False}}}


@pytest.fixture(scope="module")
def qwen3_live(tiny_export, tmp_path_factory):
    """The tiny Qwen3 export with Qwen3's tool-calling chat template (chat_template.jinja wins)."""
    folder = tmp_path_factory.mktemp("qwen3-template") / "export"
    shutil.copytree(tiny_export, folder)
    shutil.copy(DATA / "qwen3_tools.jinja", folder / "chat_template.jinja")
    with LiveServer(folder, max_batch=4, max_context=1024, api_key=API_KEY, threads=1) as server:
        yield server


def test_chat_logprobs_equal_teacher_forced(live, tiny_export):
    from edgekit.serve.protocol import ChatMessage

    out = live.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3, extra_body={"return_token_ids": True})
    choice = out.choices[0]
    content = choice.logprobs.content
    generated = choice.model_extra["token_ids"]
    assert len(content) == out.usage.completion_tokens == len(generated)
    prompt = live.app.state.server.render_chat([ChatMessage(**m) for m in MESSAGES], [])
    expected = teacher_forced(tiny_export, prompt + generated)
    for i, item in enumerate(content):
        assert item.logprob == pytest.approx(expected[len(prompt) - 1 + i, generated[i]], abs=1e-4)
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == pytest.approx(item.logprob)
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        assert item.bytes == list(item.token.encode())
    stream = live.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=5, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True)
    streamed = [t for c in stream if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    # approx: the second request may start from the prefix cache, whose logits differ by float rounding
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)


def test_n_choices_streamed_equal_whole(live):
    client = live.client()
    args = {"model": "m", "messages": MESSAGES, "max_tokens": 6, "temperature": 1.2, "seed": 5, "n": 3}
    whole = client.chat.completions.create(**args)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = {i: "" for i in range(3)}
    for chunk in client.chat.completions.create(**args, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert [texts[i] for i in range(3)] == [c.message.content for c in whole.choices]
    assert len({c.message.content for c in whole.choices}) > 1


def _schema_format(schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": "weather", "schema": schema, "strict": True}}


def test_json_schema_output_validates(live):
    client = live.client()
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=80, temperature=1.0, seed=3, n=4,
                                         response_format=_schema_format(SCHEMA))
    for choice in out.choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    stream = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=80, temperature=0, stream=True,
                                            response_format=_schema_format(SCHEMA))
    jsonschema.validate(json.loads("".join(c.choices[0].delta.content or "" for c in stream if c.choices)), SCHEMA)


def test_json_object_output_is_an_object(live):
    """A free-form object may not close within max_tokens on a random model; those that end are objects."""
    out = live.client().chat.completions.create(model="m", messages=MESSAGES, max_tokens=120, temperature=1.0,
                                                seed=0, n=4, response_format={"type": "json_object"})
    ended = [c.message.content for c in out.choices if c.finish_reason == "stop"]
    assert ended, [c.message.content for c in out.choices]
    assert all(isinstance(json.loads(text), dict) for text in ended)
    assert all(c.message.content.startswith("{") for c in out.choices)


def test_named_tool_call_through_the_models_template(qwen3_live):
    client = qwen3_live.client()
    out = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=100, temperature=0,
                                         tools=[WEATHER, TIME],
                                         tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMA)


def test_required_tool_call_streamed_reassembles_as_whole(qwen3_live):
    client = qwen3_live.client()
    args = {"model": "m", "messages": MESSAGES, "max_tokens": 100, "temperature": 0, "tools": [WEATHER, TIME],
            "tool_choice": "required"}
    whole = client.chat.completions.create(**args).choices[0].message.tool_calls[0]
    with client.chat.completions.stream(**args) as stream:  # the client's own reassembly of deltas
        final = stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, call.function.arguments) == (whole.function.name, whole.function.arguments)
    schema = {"get_weather": SCHEMA, "get_time": TIME["function"]["parameters"]}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_tool_results_round_trip_through_the_template(qwen3_live):
    from edgekit.serve.protocol import ChatMessage

    server = qwen3_live.app.state.server
    assert server.tool_family == "qwen" and server.template_takes_tools
    call = {"id": "call_1", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "UTC"}'}}
    messages = [*MESSAGES, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "12:00"}]
    ids = server.render_chat([ChatMessage(**m) for m in messages], [WEATHER, TIME])
    text = server.tokenizer.decode(ids, skip_special_tokens=False)
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>' in text
    assert "<tool_response>\n12:00\n</tool_response>" in text and text.endswith("<|im_start|>assistant\n")
    out = qwen3_live.client().chat.completions.create(model="m", messages=messages, tools=[WEATHER, TIME],
                                                      max_tokens=4, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_template_without_tools_gets_them_in_a_system_message(live):
    from edgekit.serve.protocol import ChatMessage

    server = live.app.state.server
    assert not server.template_takes_tools
    ids = server.render_chat([ChatMessage(**m) for m in MESSAGES], [TIME])
    text = server.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system\n# Tools") and '"name": "get_time"' in text


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "xml"}}, "response_format", "is not one of"),
    ({"response_format": _schema_format({"type": "nonsense"})}, "response_format", "nonsense"),
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "names no tool"),
    ({"logprobs": True, "top_logprobs": 30}, "top_logprobs", "20"),
])
def test_bad_chat_features_get_a_clear_400(live, extra, param, words):
    response = httpx.post(f"{live.url}/chat/completions", json={"messages": MESSAGES, **extra},
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_llama3_calls_parse_stream_and_constrain():
    import numpy as np

    from edgekit.export.presets import TOKENIZER_DIR
    from edgekit.serve import tools
    from edgekit.serve.grammar import GrammarTokens, tool_call_grammar
    from edgekit.tokenizer import Tokenizer

    assert tools.family("{{ '<|eot_id|>' }}") == "llama3" and tools.family("", "LlamaForCausalLM") == "llama3"
    text = '<|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}'
    message, called = tools.message("llama3", text)
    assert called and message["tool_calls"][0]["function"] == {"name": "get_time", "arguments": '{"zone": "CET"}'}
    stream = tools.ToolStream("llama3")
    deltas = [d for i in range(0, len(text), 5) for d in stream.push(text[i:i + 5], False)] + stream.push("", True)
    assert deltas[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:]) == '{"zone": "CET"}'
    assert tools.message("llama3", "plain words")[1] is False
    path = TOKENIZER_DIR / "tokenizer.json"
    grammar = GrammarTokens(path.read_text(), 2051, (2,)).constraint(tool_call_grammar("llama3", [TIME]), "tool_choice")
    ids = Tokenizer(path).encode('{"name":"get_time","parameters":{"zone":"UTC"}}')
    for token in ids:  # the well-formed call is allowed token by token, and then only the end
        assert np.isfinite(grammar.mask(np.zeros(2051, np.float32))[token])
        grammar.accept(token)
    assert np.flatnonzero(np.isfinite(grammar.mask(np.zeros(2051, np.float32)))).tolist() == [2]


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_qwen_stream_deltas_reassemble_to_the_parsed_reply(step):
    from edgekit.serve import tools

    text = ('Checking.\n<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
    message, called = tools.message("qwen", text)
    assert called and message["content"] == "Checking."
    stream = tools.ToolStream("qwen")
    deltas = [d for i in range(0, len(text), step) for d in stream.push(text[i:i + step], False)]
    deltas += stream.push("", True)
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    calls: dict[int, dict] = {}
    for d in deltas:
        for part in d.get("tool_calls", []):
            call = calls.setdefault(part["index"], {"name": "", "arguments": ""})
            call["name"] += part["function"].get("name", "")
            call["arguments"] += part["function"]["arguments"]
    assert [calls[i] for i in sorted(calls)] == [c["function"] for c in message["tool_calls"]]
    assert tools.message("qwen", "<tool_call>\nnot json\n</tool_call>") == (
        {"content": "<tool_call>\nnot json\n</tool_call>"}, False)


def test_qwen_xml_call_body_is_read_too():
    from edgekit.serve import tools

    text = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n"
            "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
    message, called = tools.message("qwen", text)
    assert called and message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 3}'}
