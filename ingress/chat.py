"""POST /v1/chat/completions: authenticate, validate, publish to Kafka, relay the frames."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from ingress.errors import error_response, sse_error_event
from ingress.metrics import IngressMetrics
from ingress.replies import FrameStream, ReplyRouter
from ingress.schema import parse_json_object, validate_chat
from state.claims import publish_cancel
from state.keys import KeyOwner
from topics import names
from topics.catalog import Catalog
from topics.errors import (
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    SwitchyardError,
    Unavailable,
    UpstreamError,
)
from topics.messages import ReplyFrame
from topics.settings import IngressSettings

TIMEOUT_HEADER = "x-switchyard-timeout-ms"
# Frames may trail the router's own deadline handling by a little; wait that much longer so
# the router's precise error, not a generic timeout, reaches the client.
_DEADLINE_SLACK_S = 1.0


@dataclass(frozen=True, slots=True)
class ChatDeps:
    settings: IngressSettings
    auth: Authenticator
    catalog: Catalog
    producer: AIOKafkaProducer
    redis: redis.Redis
    replies: ReplyRouter
    metrics: IngressMetrics


class ChatCompletions:
    def __init__(self, deps: ChatDeps) -> None:
        self._d = deps

    async def __call__(self, request: Request) -> Response:
        d = self._d
        request_id: str = request.scope["state"]["request_id"]
        owner = await d.auth.authenticate(request.headers.get("authorization"))
        body = parse_json_object(await _read_body(request, d.settings.max_body_bytes))
        chat = validate_chat(body)
        if d.catalog.model(chat.model) is None:
            raise NotFound(f"model {chat.model!r} does not exist; GET /v1/models lists them",
                           code="model_not_found", param="model")
        timeout_s = _timeout_s(request, d.settings)
        now = time.time()
        loop_deadline = asyncio.get_running_loop().time() + timeout_s + _DEADLINE_SLACK_S

        stream = FrameStream(d.replies.open(request_id), loop_deadline)
        try:
            await self._publish(request_id, owner, body, now, timeout_s, request)
            # Waiting for the first answer lets an upstream that fails before its first token
            # get a proper status code instead of a 200 stream that ends in an error.
            first = await stream.first_answer()
        except BaseException as exc:
            d.replies.close(request_id)
            if isinstance(exc, SwitchyardError) and exc.code == "deadline_exceeded":
                await self._cancel(request_id, "deadline_exceeded")
            raise
        if first.kind == "error" or not chat.stream:
            d.replies.close(request_id)
            if first.kind == "error":
                raise SwitchyardError.from_frame_data(first.data)
            return _completion_response(first.data)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return EventSourceResponse(
            self._relay(request_id, first, stream, include_usage),
            ping=15, send_timeout=30, headers={"x-request-id": request_id})

    async def _publish(self, request_id: str, owner: KeyOwner, body: dict[str, Any],
                       now: float, timeout_s: float, request: Request) -> None:
        received_ms = int(now * 1000)
        envelope = orjson.dumps({
            "schema_version": 1, "request_id": request_id, "tenant_id": owner.tenant_id,
            "key_id": owner.key_id, "received_at_ms": received_ms,
            "deadline_ms": received_ms + int(timeout_s * 1000), "endpoint": "chat.completions",
            "body": body, "reply": {"channel": self._d.replies.channel},
        })
        headers = [(names.H_REQUEST_ID, request_id.encode()),
                   (names.H_TENANT_ID, owner.tenant_id.encode()),
                   (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)]
        if traceparent := request.headers.get("traceparent"):
            headers.append((names.H_TRACEPARENT, traceparent.encode()))
        try:
            # Awaited to the broker's ack: once we answer anything, the request is durable.
            await self._d.producer.send_and_wait(names.REQUESTS, envelope,
                                                 key=request_id.encode(), headers=headers)
        except KafkaError as exc:
            raise Unavailable(f"the request queue is unavailable: {exc}",
                              code="queue_unavailable") from exc

    async def _relay(self, request_id: str, frame: ReplyFrame, stream: FrameStream,
                     include_usage: bool) -> AsyncIterator[bytes]:
        """SSE events from frames. sse-starlette runs this and the disconnect listener in one
        task group: a client that goes away cancels this generator, and the router is told."""
        finished = False
        last_chunk: dict[str, Any] = {}
        try:
            while frame.kind in ("chunk", "meta"):
                # Every chunk that has already arrived leaves in one write.
                out = []
                while True:
                    if frame.kind == "chunk":
                        last_chunk = frame.data
                        out.append(b"data: " + orjson.dumps(frame.data) + b"\n\n")
                    ready = stream.next_ready()
                    if ready is None:
                        break
                    frame = ready
                    if frame.kind not in ("chunk", "meta"):
                        break
                if out:
                    yield b"".join(out)
                if ready is None:
                    frame = await stream.next()
            finished = True
            if frame.kind == "done":
                if include_usage and frame.data.get("usage"):
                    yield b"data: " + orjson.dumps(_usage_chunk(last_chunk, frame.data)) + b"\n\n"
                yield b"data: [DONE]\n\n"
            else:
                yield sse_error_event(SwitchyardError.from_frame_data(frame.data))
        except SwitchyardError as exc:
            finished = True  # lost frames or deadline: say so, never end cleanly
            yield sse_error_event(exc)
        finally:
            self._d.replies.close(request_id)
            if not finished:
                with anyio.CancelScope(shield=True):
                    await self._cancel(request_id, "client_disconnected")

    async def _cancel(self, request_id: str, reason: str) -> None:
        self._d.metrics.cancels.labels(reason).inc()
        # If Redis is down the request's deadline still bounds the wasted work.
        with contextlib.suppress(redis.RedisError):
            await publish_cancel(self._d.redis, request_id, reason, ttl_s=3600)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"the body is larger than {limit} bytes")
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"the body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _timeout_s(request: Request, settings: IngressSettings) -> float:
    raw = request.headers.get(TIMEOUT_HEADER)
    if raw is None:
        return settings.default_deadline_s
    try:
        value = float(raw) / 1000
    except ValueError:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds",
                             code="invalid_header", param=TIMEOUT_HEADER) from None
    if not 0 < value <= settings.max_deadline_s:
        raise InvalidRequest(f"{TIMEOUT_HEADER} must be within (0, "
                             f"{int(settings.max_deadline_s * 1000)}]",
                             code="invalid_header", param=TIMEOUT_HEADER)
    return value


def _completion_response(done: dict[str, Any]) -> Response:
    completion = done.get("completion")
    if not isinstance(completion, dict):
        return error_response(UpstreamError("the provider's answer was incomplete",
                                            code="reply_incomplete"))
    completion["metadata"] = done.get("metadata")
    return Response(orjson.dumps(completion), media_type="application/json")


def _usage_chunk(last_chunk: dict[str, Any], done: dict[str, Any]) -> dict[str, Any]:
    return {"id": last_chunk.get("id", ""), "object": "chat.completion.chunk",
            "created": last_chunk.get("created", int(time.time())),
            "model": last_chunk.get("model", ""), "choices": [], "usage": done["usage"],
            "metadata": done.get("metadata")}
