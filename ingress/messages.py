"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on every model of
the catalog, for the `anthropic` SDKs and Claude Code.

A Messages request is translated into the Chat Completions request the pipeline carries
(`ingress/messages_translate.py`) and then goes exactly where a chat completion goes: the
same admission (rate limits, budgets), routing, modes, failover, billing and errors
(`ingress/chat.py` is its twin). When a route of the Anthropic dialect may serve it, the
client's own body and `anthropic-version` / `anthropic-beta` headers travel with it
(`topics/anthropic.py` `NATIVE`), and such a route sends them as they came: `cache_control`,
betas and `thinking` reach Anthropic untouched. The answer comes back as an Anthropic
`message`, or as Anthropic's stream events; errors in Anthropic's shape
(`ingress/errors.py`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.responses import JSONResponse, Response

from ingress.call import Call
from ingress.chat import category_hint
from ingress.errors import anthropic_sse_error_event, error_response
from ingress.messages_translate import PING, EventWriter, native_body, to_chat_body, to_message
from ingress.pipeline import Pipeline, Submission, client_gone, request_traceparent
from ingress.policy import MODE_HEADER, admit
from ingress.replies import FrameStream
from ingress.schema import validate_chat
from ingress.validation import parse_model
from topics.anthropic import NATIVE, PASSED_HEADERS, PROTOCOL
from topics.budgets import candidate_models
from topics.catalog import Catalog
from topics.errors import SwitchyardError, UpstreamError
from topics.limits import estimate_prompt_tokens
from topics.messages import ReplyFrame

_RELAYED = frozenset(("chunk", "meta", "progress"))


class _Request(BaseModel):
    """What a Messages body must hold before it is translated; the rest is checked as it
    is translated, and everything travels as the client sent it."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    max_tokens: int = Field(ge=1)
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None


class _CountRequest(_Request):
    max_tokens: int = Field(default=1, ge=1)  # count_tokens takes none


async def messages(call: Call) -> Response:
    """Anthropic Messages (`anthropic` SDK, Claude Code), `stream: false` and `stream: true`
    (Anthropic's SSE events), on any model of the catalog."""
    request, pipeline, owner = call.request, call.services.pipeline, call.principal
    # The tenant's catalog: its own registered providers' models too.
    catalog = await call.services.tenant_routes.catalog_for(owner.tenant_id)
    request_id = call.request_id
    body = await pipeline.read_json(request)
    streamed = parse_model(_Request, body).stream
    chat_body = to_chat_body(body)
    validate_chat(chat_body, pipeline.settings.max_image_bytes)
    admitted = admit(chat_body, catalog, "chat", owner, request.headers.get("x-tenant-id"),
                     request.headers.get(MODE_HEADER))
    job_body = admitted.body
    if _may_reach_anthropic(catalog, job_body):
        native = {"protocol": PROTOCOL, "body": native_body(body),
                  "headers": {h: v for h in PASSED_HEADERS
                              if (v := request.headers.get(h)) is not None}}
        # The envelope carries the body twice: past half the body limit, the translation
        # alone goes (the envelope must fit the queue's message limit).
        if len(orjson.dumps(native)) <= pipeline.settings.max_body_bytes // 2:
            job_body = {**job_body, NATIVE: native}
    first, stream = await call.services.admission.submit(call, pipeline, Submission(
        request_id=request_id, owner=owner, endpoint="chat.completions",
        body=job_body, routing=admitted.routing, metadata=admitted.metadata,
        timeout_s=pipeline.timeout_s(request, admitted.timeout_ms),
        traceparent=request_traceparent(request),
        client_gone=lambda: client_gone(request),
        category=category_hint(request)))
    headers = {"request-id": request_id}  # where Anthropic's SDKs look for it
    if not streamed:
        try:
            while first.kind == "progress":  # nothing to show a client that waits whole
                first = await stream.next()
        finally:
            pipeline.close(request_id)
        return _message_response(call, first, headers)
    return EventSourceResponse(_relay(pipeline, request_id, first, stream),
                               ping=15, send_timeout=30,
                               headers={"x-request-id": request_id, **headers})


async def count_tokens(call: Call) -> Response:
    """Anthropic's token count for a Messages request: an estimate (about four characters a
    token), the one admission reserves for the prompt, not the model's tokenizer."""
    request, pipeline = call.request, call.services.pipeline
    body = await pipeline.read_json(request)
    parse_model(_CountRequest, body)
    chat_body = to_chat_body({**body, "max_tokens": body.get("max_tokens", 1)})
    validate_chat(chat_body, pipeline.settings.max_image_bytes)
    # The model must be one this key may use, as for the request itself.
    admit(chat_body, await call.services.tenant_routes.catalog_for(call.principal.tenant_id),
          "chat", call.principal, request.headers.get("x-tenant-id"))
    return JSONResponse({"input_tokens": estimate_prompt_tokens(chat_body)})


def _may_reach_anthropic(catalog: Catalog, body: dict[str, Any]) -> bool:
    """Whether a route of the Anthropic dialect may serve the request: its model's routes and
    fallbacks (`auto`: every chat model). A tenant policy's fallbacks are not known here: an
    Anthropic route reached through one gets the translation."""
    return any(catalog.providers[m.provider].dialect == "anthropic"
               for m in candidate_models(catalog, body, "chat"))


def _message_response(call: Call, frame: ReplyFrame, headers: dict[str, str]) -> Response:
    if frame.kind == "error":
        return error_response(SwitchyardError.from_frame_data(frame.data),
                              request=call.request)
    completion = frame.data.get("completion")
    if not isinstance(completion, dict):
        return error_response(UpstreamError("the provider's answer was incomplete",
                                            code="reply_incomplete"), request=call.request)
    return Response(orjson.dumps(to_message(completion)), media_type="application/json",
                    headers=headers)


async def _relay(pipeline: Pipeline, request_id: str, frame: ReplyFrame,
                 stream: FrameStream) -> AsyncIterator[bytes]:
    """Anthropic's stream events from frames (`ingress/chat.py` `_relay` relays the same
    frames as OpenAI chunks; a client that goes away cancels this generator the same way)."""
    writer = EventWriter()
    finished = False
    model: str | None = None
    # As ingress/chat.py's relay: the frames relayed as SSE, to the last event.
    span = pipeline.tracing.start("reply relay", attributes={"switchyard.stream": True})
    try:
        while frame.kind in _RELAYED:
            out: list[bytes] = []
            while True:  # every frame that has already arrived leaves in one write
                if frame.kind == "chunk":
                    chunk = orjson.loads(frame.raw)
                    model = model or chunk.get("model")
                    out.extend(writer.chunk(chunk))
                elif frame.kind == "progress":
                    out.append(PING)  # work under way: the client hears life
                ready = stream.next_ready()
                if ready is None or ready.kind not in _RELAYED:
                    break
                frame = ready
            if out:
                yield b"".join(out)
            frame = ready if ready is not None else await stream.next()
        finished = True
        if frame.kind == "done":
            yield b"".join(writer.end(frame.data.get("usage"), model))
        else:
            yield anthropic_sse_error_event(SwitchyardError.from_frame_data(frame.data))
    except SwitchyardError as exc:
        finished = True  # lost frames or deadline: say so, never end cleanly
        yield anthropic_sse_error_event(exc)
    finally:
        await pipeline.end_relay(request_id, span, frame.kind, finished)
