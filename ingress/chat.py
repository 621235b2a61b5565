"""POST /v1/chat/completions (and the seed's /v1/infer): validate, admit under the request's
policy, run through the pipeline, answer as JSON or relay as SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from ingress.call import Call
from ingress.errors import error_response, sse_error_event
from ingress.money import exact_costs
from ingress.pipeline import Pipeline, Submission, client_gone, request_traceparent
from ingress.policy import MODE_HEADER, admit, fold_content_parts
from ingress.replies import FrameStream
from ingress.response_cache import (
    CachePlan,
    ResponseCache,
    hit_completion,
    hit_response,
    replay,
)
from ingress.schema import validate_chat
from topics.errors import InvalidRequest, SwitchyardError, UpstreamError
from topics.messages import ReplyFrame
from topics.response_cache import HEADER, Assembler
from topics.routing_policy import CATEGORIES


async def chat_completions(call: Call) -> Response:
    """OpenAI Chat Completions, `stream: false` and `stream: true` (SSE,
    `stream_options.include_usage`, final `data: [DONE]`); the seed product's `/v1/infer`."""
    started_s = time.perf_counter()
    request, pipeline, owner = call.request, call.services.pipeline, call.principal
    request_id = call.request_id
    body = fold_content_parts(await pipeline.read_json(request))
    chat = validate_chat(body, pipeline.settings.max_image_bytes)
    catalog = await call.services.tenant_routes.catalog_for(owner.tenant_id)
    admitted = admit(body, catalog, "chat", owner,
                     request.headers.get("x-tenant-id"), request.headers.get(MODE_HEADER))
    job = Submission(
        request_id=request_id, owner=owner, endpoint="chat.completions",
        body=admitted.body, routing=admitted.routing, metadata=admitted.metadata,
        timeout_s=pipeline.timeout_s(request, admitted.timeout_ms),
        traceparent=request_traceparent(request),
        client_gone=lambda: client_gone(request),
        category=category_hint(request))
    include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
    cache = call.services.response_cache
    plan = None if cache is None else await cache.plan(request, owner, admitted.body,
                                                       admitted.routing)
    if cache is not None and plan is not None and plan.outcome == "miss":
        entry = await cache.lookup(plan)
        if entry is not None:  # answered here: no queue, no router, no provider
            await call.services.admission.admit_cached(call, job)
            latency_ms = await cache.bill(owner, request_id, entry, started_s)
            completion = hit_completion(entry, request_id, latency_ms)
            if not chat.stream:
                return hit_response(completion)
            return EventSourceResponse(replay(completion, include_usage), ping=15,
                                       send_timeout=30,
                                       headers={"x-request-id": request_id, HEADER: "hit"})
    first, stream = await call.services.admission.submit(call, pipeline, job)
    store = None if cache is None or plan is None or plan.outcome == "bypass" \
        else (cache, plan)
    if not chat.stream:
        try:
            while first.kind == "progress":  # nothing to show a client that waits whole
                first = await stream.next()
        finally:
            pipeline.close(request_id)
        if store is not None and first.kind == "done" \
                and isinstance(first.data.get("completion"), dict):
            await store[0].store(store[1], first.data["completion"], first.data.get("metadata"))
        response = _completion_response(first)
        if plan is not None:
            response.headers.update(plan.header)
        return response
    headers = {"x-request-id": request_id}
    if plan is not None:
        headers.update(plan.header)
    return EventSourceResponse(
        _relay(pipeline, request_id, first, stream, include_usage, store),
        ping=15, send_timeout=30, headers=headers)


async def _relay(pipeline: Pipeline, request_id: str, frame: ReplyFrame, stream: FrameStream,
                 include_usage: bool,
                 store: tuple[ResponseCache, CachePlan] | None = None) -> AsyncIterator[bytes]:
    """SSE events from frames. sse-starlette runs this and the disconnect listener in one
    task group: a client that goes away cancels this generator, and the router is told.
    With `store`, the answer is assembled from its chunks and stored once it completed (a
    failed, cut or cancelled one never is)."""
    finished = False
    last_chunk: ReplyFrame | None = None
    assembler = None if store is None else Assembler()
    # The frames relayed to the client as SSE, from the first answer to the last event.
    span = pipeline.tracing.start("reply relay", attributes={"switchyard.stream": True})
    try:
        while frame.kind in _RELAYED:
            # Every chunk that has already arrived leaves in one write.
            out = []
            while True:
                if frame.kind == "chunk":
                    last_chunk = frame
                    out.append(b"data: " + frame.raw + b"\n\n")  # relayed as it came
                    if assembler is not None:
                        assembler.add(frame.data)
                elif frame.kind == "progress":
                    # An SSE comment: clients and proxies see life, parsers skip it.
                    out.append(b": progress " + frame.raw + b"\n\n")
                ready = stream.next_ready()
                if ready is None:
                    break
                frame = ready
                if frame.kind not in _RELAYED:
                    break
            if out:
                yield b"".join(out)
            if ready is None:
                frame = await stream.next()
        finished = True
        if frame.kind == "done":
            if include_usage and frame.data.get("usage"):
                template = last_chunk.data if last_chunk is not None else {}
                yield b"data: " + orjson.dumps(_usage_chunk(template, frame.data)) + b"\n\n"
            if store is not None and assembler is not None:
                if assembler.complete:
                    await store[0].store(store[1], assembler.completion(frame.data.get("usage")),
                                         frame.data.get("metadata"))
                else:
                    store[0].not_stored()
            yield b"data: [DONE]\n\n"
        else:
            yield sse_error_event(SwitchyardError.from_frame_data(frame.data))
    except SwitchyardError as exc:
        finished = True  # lost frames or deadline: say so, never end cleanly
        yield sse_error_event(exc)
    finally:
        await pipeline.end_relay(request_id, span, frame.kind, finished)


CATEGORY_HEADER = "x-switchyard-category"
_RELAYED = frozenset(("chunk", "meta", "progress"))


def category_hint(request: Request) -> str | None:
    hint = request.headers.get(CATEGORY_HEADER)
    if hint is not None and hint not in CATEGORIES:
        raise InvalidRequest(f"{CATEGORY_HEADER} must be one of {', '.join(CATEGORIES)}",
                             code="invalid_header", param=CATEGORY_HEADER)
    return hint


def _completion_response(frame: ReplyFrame) -> Response:
    if frame.kind == "error":
        return error_response(SwitchyardError.from_frame_data(frame.data))
    done = frame.data
    completion = done.get("completion")
    if not isinstance(completion, dict):
        return error_response(UpstreamError("the provider's answer was incomplete",
                                            code="reply_incomplete"))
    completion["metadata"] = exact_costs(done.get("metadata"))
    return Response(orjson.dumps(completion), media_type="application/json")


def _usage_chunk(last_chunk: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    return {"id": last_chunk.get("id", ""), "object": "chat.completion.chunk",
            "created": last_chunk.get("created", int(time.time())),
            "model": last_chunk.get("model", ""), "choices": [], "usage": done["usage"],
            "metadata": exact_costs(done.get("metadata"))}
