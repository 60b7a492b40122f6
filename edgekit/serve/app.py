"""The OpenAI-compatible HTTP app: ``create_app(folder)`` -> a FastAPI app over one shared engine.

    client ──HTTP──> handler (event loop): validate, encode, check the context, queue a Job
                         ^                                   |
                         └── asyncio.Queue <── emit ── Scheduler thread (owns the engine)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as
server-sent events ending with ``data: [DONE]``, or one JSON body), GET /health, GET /metrics.
Device side: imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.chat import END_OF_TURN, load_chat_template
from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, context_problem, token_id_problem
from edgekit.serve import protocol as p
from edgekit.serve.engine import serving_engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.scheduler import Event, Job, Scheduler
from edgekit.tokenizer import load_tokenizer
from edgekit.types import ExportedGraph

log = logging.getLogger(__name__)
DEFAULT_MAX_CONTEXT = 4096
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass
class ServeConfig:
    """What ``edgekit serve`` was asked for; None means the default."""

    max_batch: int = 8
    max_context: int | None = None  # default: min(the model's positions, 4096)
    api_key: str | None = None
    threads: int | None = None
    model_id: str | None = None  # default: the folder's name


class Server:
    """The state the handlers share: model, tokenizer, chat template, scheduler, metrics."""

    def __init__(self, folder: str | Path, config: ServeConfig):
        self.graph = ExportedGraph.load(folder)
        positions = self.graph.model.max_position_embeddings
        self.max_context = config.max_context or min(positions, DEFAULT_MAX_CONTEXT)
        if not 1 < self.max_context <= positions:
            raise EdgekitError(f"--max-context {self.max_context} is outside 2..{positions} (the model's positions)",
                               f"use --max-context {min(positions, DEFAULT_MAX_CONTEXT)}")
        if config.max_batch < 1:
            raise EdgekitError(f"--max-batch {config.max_batch} must be >= 1", "e.g. --max-batch 8")
        self.engine, self.serial_reason = serving_engine(self.graph, config.max_batch, self.max_context, config.threads)
        self.max_context = self.engine.max_context  # the engine's own limit may be lower (a TensorRT plan's)
        self.tokenizer = load_tokenizer(self.graph)
        self.template = _chat_template(self.graph)
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.engine, self.metrics)
        self.api_key = config.api_key
        self.sink: LoopSink | None = None  # set when the app starts on its event loop
        self.model_id = config.model_id or self.graph.path.name
        end_of_turn = [self.tokenizer.token_id(t) for t in END_OF_TURN] if self.tokenizer else []
        self.eos = tuple(self.graph.model.eos_token_ids)
        self.chat_eos = self.eos + tuple(i for i in end_of_turn if i is not None)

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise p.ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                             code="invalid_api_key")

    def encode(self, prompt: str | list[int] | list[str]) -> list[int]:
        if isinstance(prompt, list) and all(isinstance(x, str) for x in prompt) and prompt:
            if len(prompt) != 1:
                raise p.ApiError(400, "one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise p.ApiError(400, "this model has no tokenizer.json: send the prompt as token ids", param="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if (problem := token_id_problem(ids, self.graph.model.vocab_size)) is not None:
                raise p.ApiError(400, problem, param="prompt")
        if not ids:
            raise p.ApiError(400, "the prompt is empty", param="prompt")
        return ids

    def render_chat(self, messages: list[p.ChatMessage]) -> list[int]:
        if self.template is None or self.tokenizer is None:
            raise p.ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        try:
            text = self.template.render(messages=[{"role": m.role, "content": m.text()} for m in messages],
                                        add_generation_prompt=True, bos_token="", eos_token="")
        except Exception as exc:  # templates raise their own errors on bad conversations
            raise p.ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return self.encode(text)

    def job(self, req: p._Request, ids: list[int], max_tokens: int | None, eos: tuple[int, ...],
            queue: asyncio.Queue) -> Job:
        param = "messages" if isinstance(req, p.ChatRequest) else "prompt"
        if max_tokens is None:
            max_tokens = p.DEFAULT_COMPLETION_TOKENS if param == "prompt" else self.max_context - len(ids)
        if (problem := context_problem(len(ids), max_tokens, self.max_context, "max_tokens")) is not None:
            raise p.ApiError(400, problem, param=param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        sampling = Sampling(temperature=temperature, top_p=req.top_p, seed=req.seed)
        if self.sink is None:  # the lifespan did not run (e.g. a test client without its context)
            self.sink = LoopSink(asyncio.get_running_loop())
            self.scheduler.start()
        sink = self.sink
        return Job(ids, max_tokens, sampling, eos, req.stop_strings, self.tokenizer,
                   lambda event: sink.put(queue, event), stream=req.stream)


class LoopSink:
    """Hands events from the scheduler thread to the event loop, coalescing wake-ups.

    One ``call_soon_threadsafe`` per burst instead of one per token: with 16 rows a step makes
    16 events, and each wake-up of the loop costs a syscall and a GIL hand-off.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: list[tuple[asyncio.Queue, Event]] = []
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, event: Event) -> None:
        with self._lock:
            self._pending.append((queue, event))
            if len(self._pending) > 1:
                return  # a drain is already scheduled
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._pending = self._pending, []
        for queue, event in items:
            queue.put_nowait(event)


def _chat_template(graph: ExportedGraph) -> Any:
    try:
        source = load_chat_template(graph)
    except EdgekitError:
        return None
    import jinja2

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def create_app(folder: str | Path, config: ServeConfig | None = None) -> FastAPI:
    """Load the model at ``folder`` (export or build) and return the app; the scheduler runs with it."""
    server = Server(folder, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.sink = LoopSink(asyncio.get_running_loop())
        server.scheduler.start()
        yield
        server.scheduler.stop()

    app = FastAPI(title="edgekit serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_CountRequests, metrics=server.metrics)
    _error_handlers(app)
    _routes(app, server)
    return app


def _routes(app: FastAPI, server: Server) -> None:
    auth = [Depends(server.check_key)]

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.model_id, "batching": server.serial_reason is None,
                "max_batch": server.engine.max_batch, "max_context": server.max_context}

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict:
        created = int(server.graph.model_path.stat().st_mtime)
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": created,
                                            "owned_by": "edgekit", "max_model_len": server.max_context}]}

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        req = p.parse(p.CompletionRequest, await request.body())
        ids = server.encode(req.prompt)
        return await _answer(server, request, req, ids, req.max_tokens, server.eos, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = p.parse(p.ChatRequest, await request.body())
        ids = server.render_chat(req.messages)
        max_tokens = req.max_completion_tokens or req.max_tokens
        return await _answer(server, request, req, ids, max_tokens, server.chat_eos, chat=True)


async def _answer(server: Server, request: Request, req: Any, ids: list[int], max_tokens: int | None,
                  eos: tuple[int, ...], chat: bool) -> Response:
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job = server.job(req, ids, max_tokens, eos, queue)
    rid = p.new_id("chatcmpl" if chat else "cmpl")
    server.scheduler.submit(job)
    if req.stream:
        return StreamingResponse(_stream(server, job, queue, req, rid, chat), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        text, finish = await _collect(request, queue)
    finally:
        job.cancel()  # a no-op once finished; frees the row if the client went away
        server.scheduler.wake()
    if finish is None:
        return Response(status_code=499)  # the client closed the connection
    ids_out = job.token_ids if req.return_token_ids else None
    body = (p.chat_body if chat else p.completion_body)(rid, server.model_id, text, finish, ids_out,
                                                        p.usage(len(ids), len(job.token_ids)))
    return JSONResponse(body)


async def _collect(request: Request, queue: asyncio.Queue) -> tuple[str, str | None]:
    """All the text of a job; finish None when the client disconnected first."""
    parts = []
    while True:
        try:
            event = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return "".join(parts), None
            continue
        if event.error:
            raise p.ApiError(500, event.error, type="server_error")
        parts.append(event.text)
        if event.finish_reason:
            return "".join(parts), event.finish_reason


async def _stream(server: Server, job: Job, queue: asyncio.Queue, req: Any, rid: str, chat: bool):
    model = server.model_id
    try:
        if chat:
            yield _sse(p.chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        while True:
            event = await queue.get()
            if event.error:
                yield _sse(p.ApiError(500, event.error, type="server_error").body())
                break
            if event.text or event.finish_reason:
                if chat:
                    delta = {"content": event.text} if event.text else {}
                    yield _sse(p.chat_chunk(rid, model, delta, event.finish_reason))
                else:
                    yield _sse(p.completion_chunk(rid, model, event.text, event.finish_reason))
            if event.finish_reason:
                if req.include_usage:
                    obj = "chat.completion.chunk" if chat else "text_completion"
                    use = p.usage(len(job.prompt_ids), len(job.token_ids))
                    yield _sse(p.usage_chunk(rid, model, obj, use))
                break
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects mid-stream (the generator is cancelled/closed)
        job.cancel()
        server.scheduler.wake()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(p.ApiError)
    async def api_error(request: Request, exc: p.ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(p.ApiError(exc.status_code, str(exc.detail), type=kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(p.ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                            status_code=500)


class _CountRequests:
    """Pure ASGI middleware (streaming- and disconnect-safe): counts requests by endpoint and status."""

    def __init__(self, app: Any, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.inc(endpoint=path, code=str(status["code"]))

