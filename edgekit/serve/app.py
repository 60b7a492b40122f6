"""The OpenAI-compatible HTTP app: ``create_app(folder)`` -> a FastAPI app over one shared engine.

    client ──HTTP──> handler (event loop): validate, encode, check the context, queue a Job
                         ^                                   |
                         └── asyncio.Queue <── emit ── Scheduler thread (owns the engine)

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (streaming as
server-sent events ending with ``data: [DONE]``, or one JSON body), GET /health, GET /metrics.
A request becomes one Job per choice (prompts x n), its events tagged with the choice index;
protocol's views shape them (logprobs: edgekit.serve.logprobs, tool calls: edgekit.serve.tools,
response_format and forced calls: edgekit.serve.grammar) and edgekit.serve.respond sends them
(a stream or one body). Device side: imports neither torch nor transformers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgekit.chat import END_OF_TURN, load_chat_template
from edgekit.errors import EdgekitError
from edgekit.generate import Sampling, context_problem, token_id_problem
from edgekit.serve import protocol as p
from edgekit.serve import tools
from edgekit.serve.engine import serving_engine
from edgekit.serve.metrics import Metrics
from edgekit.serve.respond import answer
from edgekit.serve.scheduler import Event, Job, Scheduler
from edgekit.serve.speculate import check_choice, open_speculator
from edgekit.tokenizer import load_tokenizer
from edgekit.types import ExportedGraph

log = logging.getLogger(__name__)
DEFAULT_MAX_CONTEXT = 4096
DEFAULT_PREFIX_CACHE_MB = 512
SHUTDOWN_GRACE_S = 10.0  # seconds in-flight requests get to finish on SIGTERM
ENDPOINTS = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")


@dataclass
class ServeConfig:
    """What ``edgekit serve`` was asked for; None means the default."""

    max_batch: int = 8
    max_context: int | None = None  # default: min(the model's positions, 4096)
    api_key: str | None = None
    threads: int | None = None
    model_id: str | None = None  # default: the folder's name
    prefix_cache_mb: int = DEFAULT_PREFIX_CACHE_MB  # 0: no prefix cache (edgekit.serve.prefix_cache)
    prefill_batch: int | None = None  # prompts prefilled in one forward; default max_batch, 1: one at a time
    speculative: str | None = None  # ngram | draft:PATH: a row decoding alone speculates (edgekit.serve.speculate)
    draft_tokens: int | None = None  # proposed per step with speculative (default 4)


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
        if config.prefix_cache_mb < 0:
            raise EdgekitError(f"--prefix-cache-mb {config.prefix_cache_mb} must be >= 0",
                               f"e.g. --prefix-cache-mb {DEFAULT_PREFIX_CACHE_MB}; 0 turns the prefix cache off")
        if config.prefill_batch is not None and config.prefill_batch < 1:
            raise EdgekitError(f"--prefill-batch {config.prefill_batch} must be >= 1",
                               "leave it out (prompts that join together share forwards), or 1: one per forward")
        speculative = check_choice(config.speculative, config.draft_tokens)
        self.engine, self.serial_reason = serving_engine(self.graph, config.max_batch, self.max_context, config.threads,
                                                         config.prefix_cache_mb << 20, config.prefill_batch)
        self.max_context = self.engine.max_context  # the engine's own limit may be lower (a TensorRT plan's)
        self.tokenizer = load_tokenizer(self.graph)
        source = _template_source(self.graph)
        self.template = _chat_template(source)
        self.tool_family = tools.family(source or "", self.graph.model.architecture)
        self.template_takes_tools = source is not None and "tools" in source
        self.metrics = Metrics()
        self.speculator = (open_speculator(speculative, self.engine, config.draft_tokens, config.threads)
                           if speculative else None)
        self.scheduler = Scheduler(self.engine, self.metrics, self.speculator)
        self.api_key = config.api_key
        self.sink: LoopSink | None = None  # set when the app starts on its event loop
        self.model_id = config.model_id or self.graph.path.name
        end_of_turn = [self.tokenizer.token_id(t) for t in END_OF_TURN] if self.tokenizer else []
        self.eos = tuple(self.graph.model.eos_token_ids)
        self.chat_eos = self.eos + tuple(i for i in end_of_turn if i is not None)
        self._grammar_tokens: Any = None  # built on the first constrained request (it indexes the vocabulary)
        self._grammar_lock = threading.Lock()  # concurrent first requests build that index once

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            raise p.ApiError(401, "missing or incorrect API key (send Authorization: Bearer KEY)",
                             code="invalid_api_key")

    def prompts(self, prompt: str | list) -> list[tuple[list[int], str | None]]:
        """Each prompt of a completion request as (ids, its text when sent as text)."""
        if isinstance(prompt, str) or prompt and isinstance(prompt[0], int):
            prompt = [prompt]
        if not prompt:
            raise p.ApiError(400, "the prompt list is empty", param="prompt")
        return [(self.encode(item), item if isinstance(item, str) else None) for item in prompt]

    def encode(self, prompt: str | list[int]) -> list[int]:
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

    def render_chat(self, messages: list[p.ChatMessage], offered: list[dict]) -> list[int]:
        if self.template is None or self.tokenizer is None:
            raise p.ApiError(400, "this model has no chat template; use /v1/completions", param="messages")
        items = tools.template_messages(messages, offered, self.tool_family, self.template_takes_tools)
        extra = {"tools": offered} if offered and self.template_takes_tools else {}
        try:
            text = self.template.render(messages=items, add_generation_prompt=True, bos_token="", eos_token="",
                                        **extra)
        except Exception as exc:  # templates raise their own errors on bad conversations
            raise p.ApiError(400, f"the chat template rejected the messages: {exc}", param="messages") from None
        return self.encode(text)

    def constraint(self, grammar: str | None, param: str) -> Any:
        """A fresh logits mask for ``grammar`` (None: none); llguidance comes with the serve extra."""
        if grammar is None:
            return None
        with self._grammar_lock:
            if self._grammar_tokens is None:
                self._grammar_tokens = self._index_grammar_tokens()
        if isinstance(self._grammar_tokens, str):  # llguidance could not read the tokenizer (tried once)
            raise p.ApiError(501, f"{param} needs grammar-constrained decoding, and {self._grammar_tokens}; "
                                  f"send the request without {param}", param=param)
        return self._grammar_tokens.constraint(grammar, param)

    def _index_grammar_tokens(self) -> Any:
        """llguidance's index of the vocabulary, or why it cannot be built (a str)."""
        from edgekit.serve.grammar import GrammarTokens

        try:
            text = (self.graph.path / "tokenizer.json").read_text()
            return GrammarTokens(text, self.graph.model.vocab_size, self.chat_eos)
        except Exception as exc:  # e.g. a tokenizer.json without a decoder llguidance knows
            reason = f"llguidance cannot read this model's tokenizer.json ({type(exc).__name__}: {exc})"
            log.warning("grammar-constrained decoding is unavailable: %s", reason)
            return reason

    def job(self, req: p._Request, ids: list[int], max_tokens: int | None, eos: tuple[int, ...],
            queue: asyncio.Queue, tag: int, seed: int | None, **options: Any) -> Job:
        """A scheduler job whose events reach ``queue`` as (tag, event); options: logprobs, echo, processor."""
        param = "messages" if isinstance(req, p.ChatRequest) else "prompt"
        if max_tokens is None and param == "prompt":
            max_tokens = p.DEFAULT_COMPLETION_TOKENS
        elif max_tokens is None:  # chat: the rest of the context, which a long conversation may leave empty
            max_tokens = self.max_context - len(ids)
            if max_tokens < 1:
                raise p.ApiError(400, f"the messages take {len(ids)} tokens, which fill the context of "
                                      f"{self.max_context} tokens: shorten the conversation", param=param,
                                 code="context_length_exceeded")
        if (problem := context_problem(len(ids), max_tokens, self.max_context, "max_tokens")) is not None:
            raise p.ApiError(400, problem, param=param, code="context_length_exceeded")
        temperature = 1.0 if req.temperature is None else req.temperature  # OpenAI's default
        sampling = Sampling(temperature=temperature, top_p=req.top_p, seed=seed)
        if self.sink is None:  # the lifespan did not run (e.g. a test client without its context)
            self.sink = LoopSink(asyncio.get_running_loop())
            self.scheduler.start()
        sink = self.sink
        return Job(ids, max_tokens, sampling, eos, req.stop_strings, self.tokenizer,
                   lambda event: sink.put(queue, (tag, event)), stream=req.stream, **options)


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


def _template_source(graph: ExportedGraph) -> str | None:
    try:
        return load_chat_template(graph)
    except EdgekitError:
        return None


def _chat_template(source: str | None) -> Any:
    """The template compiled as transformers compiles it (its tojson, raise_exception, strftime_now)."""
    if source is None:
        return None
    import datetime

    import jinja2

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(value, indent=None, ensure_ascii=False, sort_keys=False):  # jinja's own escapes < > & for HTML
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env.from_string(source)


def uvicorn_options(log_level: str = "warning") -> dict[str, Any]:
    """The uvicorn.Config settings ``edgekit serve`` runs with.

    The edgekit loggers (the request log line at info) go through uvicorn's own handler at
    ``log_level``; on SIGTERM or Ctrl-C in-flight requests get ``EDGEKIT_SHUTDOWN_GRACE_S``
    (default 10) seconds to finish, then are cancelled, and the scheduler stops.
    """
    import copy
    import os

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["edgekit"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    grace = float(os.environ.get("EDGEKIT_SHUTDOWN_GRACE_S", SHUTDOWN_GRACE_S))
    return {"log_config": config, "log_level": log_level, "timeout_graceful_shutdown": grace}


def create_app(folder: str | Path, config: ServeConfig | None = None) -> FastAPI:
    """Load the model at ``folder`` (export or build) and return the app; the scheduler runs with it."""
    server = Server(folder, config or ServeConfig())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        server.sink = LoopSink(asyncio.get_running_loop())
        server.scheduler.start()
        yield
        server.scheduler.stop()
        if server.speculator is not None and server.scheduler.stopped:  # a draft's session, once nothing runs it
            server.speculator.close()

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
        _refuse_unsupported(req)
        prompts = server.prompts(req.prompt)
        _check_choices(len(prompts) * req.n)
        rid, queue, views = p.new_id("cmpl"), asyncio.Queue(), []
        scored = req.echo and req.logprobs is not None  # the prompt's own logprobs are wanted
        for i, (ids, text) in enumerate(prompts):
            # the prompt's text: echoed, and where text_offset of the reply starts without echo
            needed = req.echo or req.logprobs is not None
            prompt_text = (text if text is not None else _decode(server, ids)) if needed else ""
            echo_text, offset = (prompt_text, 0) if req.echo else ("", len(prompt_text))
            for j in range(req.n):
                tag = i * req.n + j  # OpenAI's choice index
                job = server.job(req, ids, req.max_tokens, server.eos, queue, tag, _seed(req.seed, j),
                                 logprobs=req.logprobs, echo=scored)
                views.append(p.CompletionView(rid, server.model_id, job, tag, echo_text, server.tokenizer, req,
                                              offset))
        return await answer(server, request, req, views, queue, rid, len(prompts))

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        req = p.parse(p.ChatRequest, await request.body())
        _check_choices(req.n)
        offered, forced = req.called_tools()
        ids = server.render_chat(req.messages, offered)
        max_tokens = req.max_completion_tokens or req.max_tokens
        grammar, param = _chat_grammar(server, req, forced)
        rid, queue, views = p.new_id("chatcmpl"), asyncio.Queue(), []
        if req.top_logprobs is not None and not req.logprobs:  # as OpenAI answers
            raise p.ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        top = (req.top_logprobs or 0) if req.logprobs else None
        family = server.tool_family if offered else None
        # off the event loop: the first grammar indexes the vocabulary (~0.5 s at 64k tokens)
        masks = await asyncio.to_thread(lambda: [server.constraint(grammar, param) for _ in range(req.n)])
        for j in range(req.n):
            job = server.job(req, ids, max_tokens, server.chat_eos, queue, j, _seed(req.seed, j), logprobs=top,
                             processor=masks[j])
            views.append(p.ChatView(rid, server.model_id, job, j, server.tokenizer, req, family))
        return await answer(server, request, req, views, queue, rid, 1)


def _refuse_unsupported(req: p.CompletionRequest) -> None:
    if req.suffix:
        raise p.ApiError(400, "suffix (insertion) is not supported: send the text before the gap as the prompt",
                         param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise p.ApiError(400, f"best_of {req.best_of} must equal n ({req.n}): edgekit does not rank candidates; "
                              "request n choices and pick among them", param="best_of")
    if req.max_tokens == 0 and not req.echo:
        raise p.ApiError(400, "max_tokens 0 generates nothing: it is for scoring the prompt, with echo",
                         param="max_tokens")


def _check_choices(count: int) -> None:
    if count > p.MAX_CHOICES:
        raise p.ApiError(400, f"{count} choices (prompts x n) exceed the limit of {p.MAX_CHOICES} per request",
                         param="n")


def _seed(seed: int | None, choice: int) -> int | None:
    return None if seed is None else seed + choice  # n seeded choices differ, and each is reproducible


def _decode(server: Server, ids: list[int]) -> str:
    """A token-id prompt's text, special tokens included: as the logprobs' tokens spell them."""
    return server.tokenizer.decode(ids, skip_special_tokens=False) if server.tokenizer is not None else ""


def _chat_grammar(server: Server, req: p.ChatRequest, forced: list[dict]) -> tuple[str | None, str]:
    """The grammar a chat reply must follow: a forced tool call, a response_format, or none."""
    from edgekit.serve.grammar import response_format_grammar, tool_call_grammar

    param = "tool_choice" if forced else "response_format"
    try:
        if forced:
            return tool_call_grammar(server.tool_family, forced), param
        return response_format_grammar(req.response_format), param
    except ImportError:  # the serve extra brings it; a bare install serves unconstrained requests only
        raise p.ApiError(501, f"{param} needs grammar-constrained decoding: install llguidance on the server "
                              "(pip install 'edgekit-llm[serve]')", param=param) from None


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
        status = {"code": 500, "open": False}  # open: a response started and not yet ended

        async def capture(message):
            if message["type"] == "http.response.start":
                status["code"], status["open"] = message["status"], True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                status["open"] = False
            await send(message)

        try:
            await self.app(scope, receive, capture)
        except asyncio.CancelledError:
            # uvicorn cancels requests still running when its shutdown grace ends: an expected end
            # (logged by the request's own line), not a crash to print a traceback for. A stream
            # that had begun is ended cleanly (without its [DONE]), so the client sees it stop.
            if status["open"]:
                with contextlib.suppress(Exception):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
            status["code"] = 499
        finally:
            path = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.inc(endpoint=path, code=str(status["code"]))

