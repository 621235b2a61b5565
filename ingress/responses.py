"""POST /v1/responses, GET and DELETE /v1/responses/{response_id}: OpenAI's Responses API on
every model of the catalog, for the current `openai` SDKs and the agent frameworks built on
them.

A Responses request, with the stored conversation its `previous_response_id` names, is
translated into the Chat Completions request the pipeline carries
(`ingress/responses_translate.py`) and then goes exactly where a chat completion goes: the
same admission (rate limits, budgets), routing, modes, failover, billing and errors
(`ingress/chat.py` is its twin; errors are OpenAI's, as there). The answer comes back as a
`response` object, or as the Responses stream events. Unless the request says `store:
false`, the response and its conversation are kept for the tenant
(`state/responses.py`, `ingress.responses_ttl_s`) once the answer is complete."""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette import EventSourceResponse
from starlette.responses import JSONResponse, Response

from ingress.call import Call
from ingress.chat import category_hint
from ingress.errors import error_response
from ingress.pipeline import Pipeline, Submission, client_gone, request_traceparent
from ingress.policy import MODE_HEADER, admit
from ingress.replies import FrameStream
from ingress.responses_translate import (
    EventWriter,
    assistant_turn,
    input_messages,
    skeleton,
    to_chat_body,
    to_response,
)
from ingress.schema import validate_chat
from ingress.validation import parse_model
from state import responses as store
from topics.errors import InvalidRequest, NotFound, SwitchyardError, UpstreamError
from topics.messages import ReplyFrame
from topics.responses import RESPONSE_PREFIX, new_id

log = logging.getLogger(__name__)

_RELAYED = frozenset(("chunk", "meta", "progress"))
_ID = re.compile(rf"{RESPONSE_PREFIX}[A-Za-z0-9_-]{{1,128}}")
_PROGRESS = b": progress\n\n"  # an SSE comment: the client hears life, parsers skip it
# Fields of the Responses API the gateway does not serve: refused, never ignored.
_UNSERVED = ("conversation", "prompt")


class _Request(BaseModel):
    """What a Responses body must hold before it is translated; the rest is checked as it
    is translated."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    stream: bool = False
    store: bool = True
    background: bool = False
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    user: str | None = None
    text: dict[str, Any] | None = None


async def create_response(call: Call) -> Response:
    """OpenAI Responses (`openai` SDK `client.responses`), `stream: false` and `stream: true`
    (the Responses stream events), on any model of the catalog; `previous_response_id`
    continues a stored response of the tenant."""
    request, pipeline, owner, services = (call.request, call.services.pipeline,
                                          call.principal, call.services)
    request_id = call.request_id
    body = await pipeline.read_json(request)
    parsed = parse_model(_Request, body)
    _check_served(body, parsed)
    history: list[dict[str, Any]] = []
    if parsed.previous_response_id is not None:
        history = await _conversation(call, parsed.previous_response_id)
    new = input_messages(body)
    chat_body = to_chat_body(body, history, new)
    validate_chat(chat_body, pipeline.settings.max_image_bytes)
    # The tenant's catalog: its own registered providers' models too.
    catalog = await services.tenant_routes.catalog_for(owner.tenant_id)
    admitted = admit(chat_body, catalog, "chat", owner,
                     request.headers.get("x-tenant-id"), request.headers.get(MODE_HEADER))
    first, stream = await services.admission.submit(call, pipeline, Submission(
        request_id=request_id, owner=owner, endpoint="chat.completions",
        body=admitted.body, routing=admitted.routing, metadata=admitted.metadata,
        timeout_s=pipeline.timeout_s(request, admitted.timeout_ms),
        traceparent=request_traceparent(request),
        client_gone=lambda: client_gone(request),
        category=category_hint(request)))
    turn = _Turn(call, skeleton(body, new_id(RESPONSE_PREFIX)), [*history, *new])
    if not parsed.stream:
        try:
            while first.kind == "progress":  # nothing to show a client that waits whole
                first = await stream.next()
        finally:
            pipeline.close(request_id)
        return await turn.answer(first)
    return EventSourceResponse(turn.relay(pipeline, first, stream), ping=15, send_timeout=30,
                               headers={"x-request-id": request_id})


async def get_response(call: Call) -> Response:
    """A stored response of the tenant (`store` was not false), within its TTL."""
    response_id = str(call.request.path_params["response_id"])
    record = await _record(call, response_id)
    if record is None:
        raise NotFound(f"Response with id '{response_id}' not found.",
                       code="response_not_found")
    return Response(orjson.dumps(record["response"]), media_type="application/json")


async def delete_response(call: Call) -> Response:
    """Forget a stored response: neither retrievable nor continued afterwards."""
    response_id = str(call.request.path_params["response_id"])
    deleted = _ID.fullmatch(response_id) is not None and await store.delete(
        call.services.redis, call.principal.tenant_id, response_id)
    if not deleted:
        raise NotFound(f"Response with id '{response_id}' not found.",
                       code="response_not_found")
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


def _check_served(body: dict[str, Any], parsed: _Request) -> None:
    if parsed.background:
        raise InvalidRequest("background responses are not served by this gateway",
                             param="background")
    for name in _UNSERVED:
        if body.get(name) is not None:
            raise InvalidRequest(f"{name} is not served by this gateway "
                                 "(previous_response_id is)", param=name)
    if parsed.metadata is not None and any(len(k) > 64 or len(v) > 512
                                           for k, v in parsed.metadata.items()):
        raise InvalidRequest("metadata keys are at most 64 characters, values 512",
                             param="metadata")


async def _record(call: Call, response_id: str) -> dict[str, Any] | None:
    if _ID.fullmatch(response_id) is None:
        return None  # not an id this gateway gives: found nowhere
    return await store.load(call.services.redis, call.principal.tenant_id, response_id)


async def _conversation(call: Call, response_id: str) -> list[dict[str, Any]]:
    """The stored conversation a new turn continues; another tenant's is not found."""
    record = await _record(call, response_id)
    messages = record.get("messages") if record is not None else None
    if not isinstance(messages, list):
        raise NotFound(f"Previous response with id '{response_id}' not found.",
                       code="previous_response_not_found", param="previous_response_id")
    return messages


class _Turn:
    """One response in the making: its skeleton, the conversation it answers, and where it
    is stored once complete."""

    def __init__(self, call: Call, response: dict[str, Any],
                 conversation: list[dict[str, Any]]) -> None:
        self._call = call
        self._response = response
        self._conversation = conversation

    async def answer(self, frame: ReplyFrame) -> Response:
        if frame.kind == "error":
            return error_response(SwitchyardError.from_frame_data(frame.data))
        completion = frame.data.get("completion")
        if not isinstance(completion, dict):
            return error_response(UpstreamError("the provider's answer was incomplete",
                                                code="reply_incomplete"))
        response = to_response(self._response, completion)
        await self._store(response)
        return Response(orjson.dumps(response), media_type="application/json",
                        headers={"x-request-id": self._call.request_id})

    async def relay(self, pipeline: Pipeline, frame: ReplyFrame,
                    stream: FrameStream) -> AsyncIterator[bytes]:
        """The Responses stream events from frames (`ingress/chat.py` `_relay` relays the
        same frames as OpenAI chunks; a client that goes away cancels this generator the
        same way)."""
        request_id = self._call.request_id
        writer = EventWriter(self._response)
        finished = False
        # As ingress/chat.py's relay: the frames relayed as SSE, to the last event.
        span = pipeline.tracing.start("reply relay", attributes={"switchyard.stream": True})
        try:
            yield b"".join(writer.start())
            while frame.kind in _RELAYED:
                out: list[bytes] = []
                while True:  # every frame that has already arrived leaves in one write
                    if frame.kind == "chunk":
                        out.extend(writer.chunk(orjson.loads(frame.raw)))
                    elif frame.kind == "progress":
                        out.append(_PROGRESS)
                    ready = stream.next_ready()
                    if ready is None or ready.kind not in _RELAYED:
                        break
                    frame = ready
                if out:
                    yield b"".join(out)
                frame = ready if ready is not None else await stream.next()
            finished = True
            if frame.kind == "done":
                closing = writer.end(frame.data.get("usage"))
                # Stored before the client hears it is complete: it may continue at once.
                await self._store(writer.response)
                yield b"".join(closing)
            else:
                yield writer.fail(SwitchyardError.from_frame_data(frame.data).to_dict())
        except SwitchyardError as exc:
            finished = True  # lost frames or deadline: say so, never end cleanly
            yield writer.fail(exc.to_dict())
        finally:
            await pipeline.end_relay(request_id, span, frame.kind, finished)

    async def _store(self, response: dict[str, Any]) -> None:
        if not response["store"]:
            return
        services, tenant_id = self._call.services, self._call.principal.tenant_id
        record = {"response": response,
                  "messages": [*self._conversation, *assistant_turn(response["output"])]}
        try:
            await store.save(services.redis, tenant_id, response["id"], record,
                             services.settings.ingress.responses_ttl_s)
        except Exception:
            # The answer stands (it is billed, and the client has it): only its later
            # retrieval and continuation are lost.
            log.warning("could not store response %s of request %s", response["id"],
                        self._call.request_id, exc_info=True)
