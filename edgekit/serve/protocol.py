"""OpenAI-compatible request models, response bodies and error bodies (the subset edgekit serves).

Requests are validated strictly (a string where an integer belongs is a 400, not a coercion);
unknown fields are ignored, as OpenAI-compatible servers commonly do.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edgekit.serve.logprobs import Formatter
from edgekit.serve.tools import ToolStream
from edgekit.serve.tools import message as tools_message

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_CHOICES = 64  # n (times the prompts of a completion): each choice is a sequence in the batch
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


class ApiError(Exception):
    """An error answered with an OpenAI-style body: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    return_token_ids: bool = False  # extension (as vLLM): the generated ids in each choice

    @property
    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionRequest(_Request):
    """POST /v1/completions: prompts as text, texts, token ids or lists of token ids (one choice each)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0)  # 0: score the prompt only (with echo)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class Function(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    """A tool the model may call: ``{"type": "function", "function": {name, description, parameters}}``."""

    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["function"]
    function: Function


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    name: str
    arguments: str


class ToolCall(BaseModel):
    """A call the assistant made in an earlier turn (sent back with the conversation)."""

    model_config = ConfigDict(strict=True, extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None

    def called_tools(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """The tools offered to the model, and those it must call one of (required or named; else [])."""
        tools = [t.model_dump(exclude_none=True) for t in self.tools or []]
        choice = self.tool_choice or ("auto" if tools else "none")
        if choice == "none" or not tools:
            return [], []
        if isinstance(choice, dict):
            name = (choice.get("function") or {}).get("name")
            named = [t for t in tools if t["function"]["name"] == name]
            if choice.get("type") != "function" or not named:
                known = ", ".join(t["function"]["name"] for t in tools)
                raise ApiError(400, f"tool_choice names no tool of this request (tools: {known})",
                               param="tool_choice")
            return tools, named
        return tools, tools if choice == "required" else []


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Validate a JSON body, turning pydantic's errors into one 400 that names the field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {first['msg']}") from None
        param = ".".join(str(p) for p in first["loc"] if not _union_tag(p)) or None
        raise ApiError(400, f"{param or 'body'}: {first['msg']}", param=param) from None


def _union_tag(part: Any) -> bool:
    """Pydantic names the union member in an error's location ('prompt', 'list[int]', 0): not a field."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool", "none"))


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_choice(index: int, text: str, finish: str | None, logprobs: dict | None = None,
                      ids: list[int] | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return choice


def completion_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def completion_chunk(rid: str, model: str, choice: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [choice]}


def chat_choice(index: int, message: dict, finish: str | None, logprobs: dict | None = None,
                ids: list[int] | None = None) -> dict:
    choice = {"index": index, "message": {"role": "assistant", **message}, "logprobs": logprobs,
              "finish_reason": finish}
    if ids is not None:
        choice["token_ids"] = ids
    return choice


def chat_body(rid: str, model: str, choices: list[dict], use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None, index: int = 0,
               logprobs: dict | None = None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


class CompletionView:
    """One choice of /v1/completions as it streams (chunks) and as it ends (the choice object)."""

    def __init__(self, rid: str, model: str, job: Any, index: int, echo_text: str, tokenizer: Any,
                 req: CompletionRequest, offset: int = 0):
        self.rid, self.model, self.job, self.index, self.echo_text = rid, model, job, index, echo_text
        # offset: where the reply's text_offset starts (OpenAI's offsets index prompt + completion)
        self.fmt = Formatter(tokenizer, offset) if req.logprobs is not None else None
        self.return_ids, self.started, self.used = req.return_token_ids, False, 0  # started: prompt sent

    def first(self) -> list[dict]:
        return []

    def chunks(self, text: str, token_ids: list[int], finish: str | None) -> list[dict]:
        """The chunks for one event of the job; the first carries the echoed prompt."""
        ids, entries, prompt = self._new(token_ids)
        if not self.started:
            self.started, text = True, self.echo_text + text
        if not (text or finish or ids):
            return []
        logprobs = self.fmt.completion(ids, entries, prompt) if self.fmt else None
        return [completion_chunk(self.rid, self.model, completion_choice(self.index, text, finish, logprobs))]

    def final(self, text: str, finish: str) -> dict:
        ids, entries, prompt = self._new(self.job.token_ids)
        logprobs = self.fmt.completion(ids, entries, prompt) if self.fmt else None
        return completion_choice(self.index, self.echo_text + text, finish, logprobs,
                                 self.job.token_ids if self.return_ids else None)

    def _new(self, token_ids: list[int]) -> tuple[list[int], list, int]:
        """The ids and entries not reported yet: the echoed prompt's first (their count third), then
        generated tokens."""
        if self.fmt is None:
            return [], [], 0
        ids, entries = [], []
        if not self.started and self.job.prompt_logprobs is not None:
            ids, entries = list(self.job.prompt_ids), list(self.job.prompt_logprobs)
        new = self.job.token_logprobs[self.used: self.used + len(token_ids)]
        self.used += len(new)
        return ids + token_ids[: len(new)], entries + new, len(ids)


class ChatView:
    """One choice of /v1/chat/completions: content deltas, tool-call deltas, logprobs."""

    def __init__(self, rid: str, model: str, job: Any, index: int, tokenizer: Any, req: ChatRequest,
                 family: str | None):
        self.rid, self.model, self.job, self.index, self.family = rid, model, job, index, family
        self.fmt = Formatter(tokenizer) if req.logprobs else None
        self.tools = ToolStream(family) if family else None
        self.return_ids, self.used = req.return_token_ids, 0

    def first(self) -> list[dict]:
        return [chat_chunk(self.rid, self.model, {"role": "assistant", "content": ""}, None, self.index)]

    def chunks(self, text: str, token_ids: list[int], finish: str | None) -> list[dict]:
        logprobs = self._logprobs(len(token_ids))
        if self.tools is None:
            deltas = [{"content": text}] if text else []
        else:
            deltas = self.tools.push(text, final=finish is not None)
        if finish is not None and self.tools is not None and self.tools.calls:
            finish = "tool_calls"
        out = [chat_chunk(self.rid, self.model, d, None, self.index) for d in deltas]
        if logprobs is not None:
            if not out:
                out.append(chat_chunk(self.rid, self.model, {}, None, self.index))
            out[0]["choices"][0]["logprobs"] = logprobs
        if finish is not None:
            out.append(chat_chunk(self.rid, self.model, {}, finish, self.index))
        return out

    def final(self, text: str, finish: str) -> dict:
        message, called = tools_message(self.family, text) if self.family else ({"content": text}, False)
        return chat_choice(self.index, message, "tool_calls" if called else finish, self._logprobs(None),
                           self.job.token_ids if self.return_ids else None)

    def _logprobs(self, count: int | None) -> dict | None:
        if self.fmt is None:
            return None
        end = len(self.job.token_logprobs) if count is None else self.used + count
        entries, self.used = self.job.token_logprobs[self.used: end], end
        return self.fmt.chat(entries) if entries or count is None else None
