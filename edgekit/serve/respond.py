"""Answering a request: queue its jobs, then stream their events as server-sent events or
collect them into one JSON body; cancel what still runs when the client leaves; log one line.

``answer`` is called by the handlers of edgekit.serve.app once they have built one view per
choice (protocol's CompletionView / ChatView, each holding its Job).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from edgekit.serve import protocol as p

request_log = logging.getLogger("edgekit.serve.requests")  # one info line per request


async def answer(server: Any, request: Request, req: Any, views: list, queue: asyncio.Queue, rid: str,
                 prompts: int) -> Response:
    """Submit each view's job, then answer: a stream, or (all choices done) one body; ``server`` is
    edgekit.serve.app's Server, ``prompts`` how many prompts the ``views`` (prompts x n) come from."""
    for view in views:
        server.scheduler.submit(view.job)
    if req.stream:
        return StreamingResponse(_stream(server, views, queue, req, rid, prompts), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    results = None
    try:
        results = await _collect(request, queue, len(views))
    finally:
        _finish(server, views, rid, "disconnected" if results is None else None, prompts)
    if results is None:
        return Response(status_code=499)  # the client closed the connection
    choices = [view.final(*results[view.index]) for view in views]
    chat = isinstance(req, p.ChatRequest)
    body = (p.chat_body if chat else p.completion_body)(rid, server.model_id, choices, _usage(views, prompts))
    return JSONResponse(body)


def _usage(views: list, prompts: int) -> dict:
    """OpenAI counts each prompt once, however many choices it has."""
    step = len(views) // prompts
    prompt_tokens = sum(len(v.job.prompt_ids) for v in views[::step])
    return p.usage(prompt_tokens, sum(len(v.job.token_ids) for v in views))


def _finish(server: Any, views: list, rid: str, status: str | None, prompts: int) -> None:
    """Cancel what still runs (a no-op once finished) and log the request's one line."""
    for view in views:
        view.job.cancel()  # frees the row if the client went away
    server.scheduler.wake()
    jobs = [view.job for view in views]
    firsts = [j.first_token_at - j.submitted for j in jobs if j.first_token_at is not None]
    ttft = f"{min(firsts) * 1000:.1f} ms" if firsts else "-"
    status = status or ",".join(sorted({j.finish_reason or "cancelled" for j in jobs}))
    use = _usage(views, prompts)
    request_log.info("%s: %d tokens in, %d out, ttft %s, %s", rid, use["prompt_tokens"], use["completion_tokens"],
                     ttft, status)


async def _collect(request: Request, queue: asyncio.Queue, count: int) -> dict[int, tuple[str, str]] | None:
    """All the text of ``count`` jobs by tag; None when the client disconnected first."""
    parts: dict[int, list[str]] = {}
    done: dict[int, tuple[str, str]] = {}
    while len(done) < count:
        try:
            tag, event = await asyncio.wait_for(queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return None
            continue
        if event.error:
            raise p.ApiError(500, event.error, type="server_error")
        parts.setdefault(tag, []).append(event.text)
        if event.finish_reason:
            done[tag] = ("".join(parts[tag]), event.finish_reason)
    return done


async def _stream(server: Any, views: list, queue: asyncio.Queue, req: Any, rid: str, prompts: int):
    status = "disconnected"
    try:
        for view in views:
            for chunk in view.first():
                yield _sse(chunk)
        left = len(views)
        while left:
            tag, event = await queue.get()
            if event.error:
                status = "error"
                yield _sse(p.ApiError(500, event.error, type="server_error").body())
                break
            for chunk in views[tag].chunks(event.text, event.token_ids, event.finish_reason):
                yield _sse(chunk)
            left -= event.finish_reason is not None
        else:
            status = None
            if req.include_usage:
                obj = "chat.completion.chunk" if isinstance(req, p.ChatRequest) else "text_completion"
                yield _sse(p.usage_chunk(rid, server.model_id, obj, _usage(views, prompts)))
        yield "data: [DONE]\n\n"
    except asyncio.CancelledError:  # the server's shutdown grace ended (a client going away closes it instead)
        status = "cancelled"
        raise
    finally:  # also when the client disconnects mid-stream (the generator is cancelled/closed)
        _finish(server, views, rid, status, prompts)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
