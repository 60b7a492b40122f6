"""Tool calls: offered through the model's own chat template, parsed out of its reply.

Two formats, by chat-template family:

    qwen    (Qwen2.5, Qwen3, Qwen3.5; Hermes)  <tool_call>\\n{"name": "f", "arguments": {...}}\\n</tool_call>
                                                one block per call, text may come before them
                                                (an XML body, <function=f><parameter=k>v</parameter>
                                                </function>, is read too)
    llama3  (Llama 3.1+)                        the whole reply is {"name": "f", "parameters": {...}},
                                                optionally after <|python_tag|>

The family comes from the template's own text (what it tells the model to write), else from
the architecture. A template that never mentions ``tools`` gets them described in a system
message in its family's format, so any chat model can be offered tools.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

QWEN_OPEN, QWEN_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_CHUNK = 16  # characters of arguments per streamed delta


def family(template_source: str, architecture: str = "") -> str:
    """'qwen' or 'llama3': the tool-call format the model was trained to write."""
    if QWEN_OPEN in template_source:
        return "qwen"
    if PYTHON_TAG in template_source or "<|eot_id|>" in template_source or architecture.startswith("Llama"):
        return "llama3"
    return "qwen"


def describe(family_name: str, tools: list[dict[str, Any]]) -> str:
    """A system-prompt text offering ``tools`` (for templates that do not render them)."""
    specs = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    if family_name == "llama3":
        return ("You have access to the following functions. To call one, reply with only a JSON object "
                '{"name": function name, "parameters": {argument name: value}}.\n\n' + specs)
    call = '{"name": <function-name>, "arguments": <args-json-object>}'
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{specs}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            f"{QWEN_OPEN}{QWEN_CLOSE} XML tags:\n{QWEN_OPEN}\n{call}\n{QWEN_CLOSE}")


def template_messages(messages: list[Any], tools: list[dict[str, Any]], family_name: str,
                      template_takes_tools: bool) -> list[dict[str, Any]]:
    """Request messages as chat templates read them (arguments as objects, as transformers passes them)."""
    out = []
    for m in messages:
        item: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = [{"type": "function", "id": c.id,
                      "function": {"name": c.function.name, "arguments": _loads(c.function.arguments)}}
                     for c in m.tool_calls]
            item["tool_calls"] = calls
            if not template_takes_tools:  # the template would drop them: write them as the model does
                item["content"] = (item["content"] + "\n" + _calls_text(family_name, calls)).strip()
        if m.tool_call_id:
            item["tool_call_id"] = m.tool_call_id
        out.append(item)
    if tools and not template_takes_tools:
        text = describe(family_name, tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
        else:
            out.insert(0, {"role": "system", "content": text})
    return out


def parse(family_name: str, text: str) -> tuple[str, list[dict[str, Any]]]:
    """The reply's text without its calls, and its calls as [{"name", "arguments" (a JSON string)}]."""
    if family_name == "llama3":
        call = _llama3_call(text)
        return ("", [call]) if call else (text, [])
    content, calls, rest = [], [], text
    while (start := rest.find(QWEN_OPEN)) >= 0:
        end = rest.find(QWEN_CLOSE, start)
        block = rest[start + len(QWEN_OPEN): end if end >= 0 else len(rest)]
        call = _call(block, "arguments") or _xml_call(block)
        if call is None:
            break
        content.append(rest[:start])
        calls.append(call)
        rest = rest[end + len(QWEN_CLOSE):] if end >= 0 else ""
    content.append(rest)
    return "".join(content).strip() if calls else text, calls


def message(family_name: str, text: str) -> tuple[dict[str, Any], bool]:
    """The assistant message for a whole reply, and whether it called tools."""
    content, calls = parse(family_name, text)
    if not calls:
        return {"content": text}, False
    return {"content": content or None, "tool_calls": [_openai(call, i) for i, call in enumerate(calls)]}, True


class ToolStream:
    """Text deltas in, chat deltas out: content streams live, each call once its block is complete.

    A call goes out as the official client reassembles it: a first delta with index, id, type and
    function.name (arguments ""), then the arguments in chunks.
    """

    def __init__(self, family_name: str):
        self.family, self.buffer, self.calls = family_name, "", 0
        self._sent_text = False

    def push(self, text: str, final: bool) -> list[dict[str, Any]]:
        self.buffer += text
        if self.family == "llama3":
            return self._push_llama3(final)
        deltas = []
        while True:
            start = self.buffer.find(QWEN_OPEN)
            if start < 0:
                # held back: a tail that may begin a call, and the whitespace before it (not content then)
                cut = len(self.buffer) if final else len(self.buffer) - _partial_tail(self.buffer, QWEN_OPEN)
                cut = cut if final else len(self.buffer[:cut].rstrip())
                deltas += self._content(self.buffer[:cut])
                self.buffer = self.buffer[cut:]
                return deltas
            end = self.buffer.find(QWEN_CLOSE, start)
            if end < 0 and not final:
                deltas += self._content(self.buffer[:start].rstrip())
                self.buffer = self.buffer[start:]
                return deltas
            _, calls = parse("qwen", self.buffer[: end + len(QWEN_CLOSE)] if end >= 0 else self.buffer)
            if not calls:  # not a well-formed call after all: it was text
                deltas += self._content(self.buffer)
                self.buffer = ""
                return deltas
            deltas += self._content(self.buffer[:start].rstrip())
            deltas += self._call_deltas(calls[0])
            self.buffer = self.buffer[end + len(QWEN_CLOSE):] if end >= 0 else ""

    def _push_llama3(self, final: bool) -> list[dict[str, Any]]:
        stripped = self.buffer.lstrip()
        head = stripped.removeprefix(PYTHON_TAG).lstrip()
        undecided = not stripped or PYTHON_TAG.startswith(stripped) or stripped.startswith(PYTHON_TAG) and not head
        if not self._sent_text and (undecided or head.startswith("{")):
            if not final:
                return []  # a call is parsed whole, at the end
            call = _llama3_call(self.buffer)
            if call:
                self.buffer = ""
                return self._call_deltas(call)
        out, self.buffer = self._content(self.buffer), ""
        return out

    def _content(self, text: str) -> list[dict[str, Any]]:
        if not text or self.calls and not text.strip():  # whitespace between calls is not content
            return []
        self._sent_text = True
        return [{"content": text}]

    def _call_deltas(self, call: dict[str, Any]) -> list[dict[str, Any]]:
        first = _openai(call, self.calls)
        args = first["function"]["arguments"]
        first["function"] = {"name": call["name"], "arguments": ""}
        deltas = [{"tool_calls": [first]}]
        for i in range(0, len(args), ARGUMENT_CHUNK):
            chunk = args[i:i + ARGUMENT_CHUNK]
            deltas.append({"tool_calls": [{"index": self.calls, "function": {"arguments": chunk}}]})
        self.calls += 1
        return deltas


def _openai(call: dict[str, Any], index: int) -> dict[str, Any]:
    return {"index": index, "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": call["name"], "arguments": call["arguments"]}}


def _call(block: str, key: str) -> dict[str, Any] | None:
    """{"name", "arguments" (JSON text)} from one call's JSON, or None when it is not one."""
    try:
        obj = json.loads(block.strip())
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(key, obj.get("arguments", obj.get("parameters", {})))
    return {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}


def _xml_call(block: str) -> dict[str, Any] | None:
    """The XML form some Qwen templates (Qwen3-Coder style) ask for inside <tool_call>:
    <function=NAME><parameter=KEY>VALUE</parameter>...</function>; a VALUE that is JSON is read as JSON."""
    match = re.fullmatch(r"\s*<function=([^>\s]+)>(.*?)</function>\s*", block, re.S)
    if match is None:
        return None
    params = re.findall(r"<parameter=([^>\s]+)>\n?(.*?)\n?</parameter>", match.group(2), re.S)
    args = {key: _loads(value) for key, value in params}
    return {"name": match.group(1), "arguments": json.dumps(args, ensure_ascii=False)}


def _llama3_call(text: str) -> dict[str, Any] | None:
    body = text.strip().removeprefix(PYTHON_TAG).strip()
    return _call(body, "parameters") if body.startswith("{") else None


def _loads(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except json.JSONDecodeError:
        return arguments


def _calls_text(family_name: str, calls: list[dict[str, Any]]) -> str:
    key = "parameters" if family_name == "llama3" else "arguments"
    items = [json.dumps({"name": c["function"]["name"], key: c["function"]["arguments"]}, ensure_ascii=False)
             for c in calls]
    if family_name == "llama3":
        return "\n".join(items)
    return "\n".join(f"{QWEN_OPEN}\n{item}\n{QWEN_CLOSE}" for item in items)


def _partial_tail(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that begins ``marker`` (held back until it resolves)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0
