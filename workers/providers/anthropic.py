"""The Anthropic Messages wire protocol (POST {base_url}/messages, API version 2023-06-01).

Requests are translated from OpenAI Chat Completions by `anthropic_translate` (which
documents every parameter: translated, ignored as harmless, or refused); answers are
translated back here into `chat.completion` objects and `chat.completion.chunk` streams.

Version 2023-06-01 is pinned on purpose: it is the version this translation was written
against, and it still carries `temperature` / `top_p` / `top_k`, which version 2026-10-21
(the default of the 2.x SDKs) removed. Models that accept only default sampling (Claude 4.7
and later) answer a non-default `temperature` with a 400, which is relayed with its message.

Answers: text blocks → `content`; `tool_use` blocks → `tool_calls` (`arguments` is the JSON
of `input`; in streams each call's `index` is its ordinal among tool calls, not its block
index); `thinking` blocks → the `reasoning_content` extension, never `content`. With the
json_object emulation the forced tool's input is the `content`. Usage: prompt = input +
cache reads + cache writes, cached = cache reads, completion = output tokens.

A request that came in through the Messages ingress carries the client's own Anthropic body
and `anthropic-version` / `anthropic-beta` headers (`topics/anthropic.py` `NATIVE`): that
body is sent as it is, its model replaced by the route's, with those headers (the pinned
version when the client sent none), so `cache_control`, beta features and everything else
the OpenAI shape cannot carry reach Anthropic untouched. The answer comes back the same
way as any other."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from topics.anthropic import API_VERSION, FINISH_OF_STOP, native_of, openai_usage
from topics.errors import SwitchyardError, UpstreamError
from workers.providers.anthropic_translate import MessagesRequest, to_messages_request
from workers.providers.base import (
    MalformedEvents,
    MalformedHook,
    Route,
    SseEvent,
    Usage,
    provider_answer,
    provider_events,
)
from workers.providers.errors import (
    Kind,
    kind_of_status,
    provider_error,
    refine_bad_request,
    stream_cut,
)

_KIND_OF_TYPE = {
    "invalid_request_error": Kind.BAD_REQUEST,
    "request_too_large": Kind.BAD_REQUEST,
    "not_found_error": Kind.BAD_REQUEST,
    "authentication_error": Kind.AUTH,
    "permission_error": Kind.AUTH,
    "billing_error": Kind.AUTH,  # our account cannot pay: the client did nothing wrong
    "rate_limit_error": Kind.RATE_LIMITED,
    "overloaded_error": Kind.OVERLOADED,
    "timeout_error": Kind.TIMEOUT,
    "api_error": Kind.SERVER_ERROR,
}


class AnthropicMessages:
    def __init__(self, session: aiohttp.ClientSession,
                 on_malformed: MalformedHook | None = None) -> None:
        self._session = session
        self._on_malformed = on_malformed

    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        request, headers = _request(route, body)
        raw = await provider_answer(
            route, lambda: self._post(route, request.payload, headers, request_id), http_error)
        message = _json(route.provider, raw, "a response")
        return to_completion(route, message, request.json_tool)

    async def stream(self, route: Route, body: dict[str, Any],
                     request_id: str) -> AsyncGenerator[dict[str, Any], None]:
        request, headers = _request(route, body)
        payload = {**request.payload, "stream": True}
        translator = StreamTranslator(route, request.json_tool)
        events = MalformedEvents(route.provider, request_id, self._on_malformed)
        async for event in provider_events(
                route, lambda: self._post(route, payload, headers, request_id), http_error):
            if event.event == "ping":
                continue
            data = events.parse(event.data)
            if data is None:
                continue
            for chunk in translator.feed_data(event.event, data):
                yield chunk
            if translator.done:
                return
        for chunk in translator.end():  # the body ended without message_stop
            yield chunk

    def _post(self, route: Route, payload: dict[str, Any], passed: dict[str, str],
              request_id: str) -> Any:
        headers = {"anthropic-version": API_VERSION, **passed,
                   "content-type": "application/json", "X-Client-Request-Id": request_id}
        if route.api_key:
            headers["x-api-key"] = route.api_key
        return self._session.post(
            f"{route.base_url}/messages", data=orjson.dumps(payload), headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=route.timeouts.connect_s))


def _request(route: Route, body: dict[str, Any]) -> tuple[MessagesRequest, dict[str, str]]:
    """The Anthropic request for `body` and the client headers it goes with: the client's own
    Anthropic request when it came in as one (`topics/anthropic.py`), else the translation."""
    native = native_of(body)
    if native is None:
        return to_messages_request(route.provider, body, route.upstream_model), {}
    # The stream flag is the router's to set (a council member answers whole).
    payload = {k: v for k, v in native["body"].items() if k != "stream"}
    payload["model"] = route.upstream_model
    headers = native.get("headers") or {}
    return MessagesRequest(payload), {str(k): str(v) for k, v in headers.items()}


def usage_of(usage: dict[str, Any]) -> Usage:
    """Anthropic bills three kinds of input; OpenAI's prompt_tokens is their sum."""
    return Usage(**openai_usage(usage))


def finish_reason(stop_reason: str | None, has_tool_calls: bool) -> str:
    finish = FINISH_OF_STOP.get(stop_reason or "", "stop")
    # The json_object tool is not a tool call the client sees: that answer just stops.
    return "stop" if finish == "tool_calls" and not has_tool_calls else finish


def to_completion(route: Route, message: dict[str, Any],
                  json_tool: str | None) -> dict[str, Any]:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[dict[str, Any]] = []
    document: str | None = None
    for block in message.get("content") or []:
        kind = block.get("type")
        if kind == "text":
            texts.append(str(block.get("text") or ""))
        elif kind == "tool_use" and json_tool is not None and block.get("name") == json_tool:
            document = orjson.dumps(block.get("input") or {}).decode()
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function",
                          "function": {"name": block.get("name"),
                                       "arguments": orjson.dumps(block.get("input") or {})
                                       .decode()}})
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking") or ""))
        # redacted_thinking and server-tool blocks have no Chat Completions counterpart
    # A string even when the answer is only tool calls: "" where OpenAI writes null, which
    # the seed product's Rust SDK cannot decode (workers/providers/base.py `text_content`).
    content = "".join(texts)
    if json_tool is not None and document is not None:
        content = document  # the tool was forced: the document is the whole answer
    out: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if calls:
        out["tool_calls"] = calls
    if reasoning:
        out["reasoning_content"] = "".join(reasoning)
    return {"id": str(message.get("id") or ""), "object": "chat.completion",
            "created": int(time.time()), "model": str(message.get("model") or
                                                     route.upstream_model),
            "choices": [{"index": 0, "message": out, "logprobs": None,
                         "finish_reason": finish_reason(message.get("stop_reason"),
                                                        bool(calls))}],
            "usage": usage_of(message.get("usage") or {}).to_openai()}


class StreamTranslator:
    """Anthropic stream events in, OpenAI chunks out; `done` once message_stop is seen."""

    def __init__(self, route: Route, json_tool: str | None) -> None:
        self._provider = route.provider
        self._json_tool = json_tool
        self._id = ""
        self._model = route.upstream_model
        self._created = int(time.time())
        self._calls: dict[int, int] = {}  # content block index → tool-call ordinal
        self._json_blocks: set[int] = set()
        self._usage: dict[str, Any] = {}
        self._stop_reason: str | None = None
        self.done = False

    def feed(self, event: SseEvent) -> list[dict[str, Any]]:
        if event.event == "ping":
            return []
        return self.feed_data(event.event, _json(self._provider, event.data, "a stream event"))

    def feed_data(self, name: str | None, data: dict[str, Any]) -> list[dict[str, Any]]:
        """`feed` for an event whose data is already parsed."""
        kind = data.get("type") or name
        if kind == "error":
            raise stream_error(self._provider, data)
        if kind == "message_start":
            message = data.get("message") or {}
            self._id = str(message.get("id") or "")
            self._model = str(message.get("model") or self._model)
            self._usage = dict(message.get("usage") or {})
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(int(data.get("index", 0)), data.get("content_block") or {})
        if kind == "content_block_delta":
            return self._delta(int(data.get("index", 0)), data.get("delta") or {})
        if kind == "message_delta":
            self._stop_reason = (data.get("delta") or {}).get("stop_reason")
            # message_delta usage counts are cumulative totals: they replace, never add.
            self._usage.update({k: v for k, v in (data.get("usage") or {}).items()
                                if v is not None})
            return []
        if kind == "message_stop":
            return self._finish()
        return []  # content_block_stop, and event types added after this was written

    def end(self) -> list[dict[str, Any]]:
        """The body ended without `message_stop`: the answer is whole if its `message_delta`
        said why it stopped (its usage came with it); else the stream was cut."""
        if self._stop_reason is None:
            raise stream_cut(self._provider)
        return self._finish()

    def _finish(self) -> list[dict[str, Any]]:
        self.done = True
        finish = finish_reason(self._stop_reason, bool(self._calls))
        usage = usage_of(self._usage).to_openai()
        return [self._chunk({}, finish), {**self._envelope(), "choices": [], "usage": usage}]

    def _block_start(self, index: int, block: dict[str, Any]) -> list[dict[str, Any]]:
        kind = block.get("type")
        if kind == "tool_use" and self._json_tool is not None \
                and block.get("name") == self._json_tool:
            self._json_blocks.add(index)
            return []
        if kind == "tool_use":
            ordinal = self._calls[index] = len(self._calls)
            return [self._chunk({"tool_calls": [{
                "index": ordinal, "id": block.get("id"), "type": "function",
                "function": {"name": block.get("name"), "arguments": ""}}]})]
        if kind == "text" and block.get("text") and self._json_tool is None:
            return [self._chunk({"content": block["text"]})]
        return []

    def _delta(self, index: int, delta: dict[str, Any]) -> list[dict[str, Any]]:
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text") and self._json_tool is None:
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json"):
            if index in self._json_blocks:
                return [self._chunk({"content": delta["partial_json"]})]
            if index in self._calls:
                return [self._chunk({"tool_calls": [{
                    "index": self._calls[index],
                    "function": {"arguments": delta["partial_json"]}}]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        return []  # signature and citation deltas have no Chat Completions counterpart

    def _envelope(self) -> dict[str, Any]:
        return {"id": self._id, "object": "chat.completion.chunk", "created": self._created,
                "model": self._model}

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {**self._envelope(), "choices": [{"index": 0, "delta": delta,
                                                 "logprobs": None, "finish_reason": finish}]}


def _json(provider: str, raw: bytes, what: str) -> dict[str, Any]:
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise UpstreamError(f"{provider} sent {what} that is not a JSON object",
                            code="upstream_bad_response")
    return data


def _classify(error: object, fallback: Kind) -> tuple[Kind, str | None]:
    if not isinstance(error, dict):
        return fallback, None
    message = error.get("message")
    kind = _KIND_OF_TYPE.get(str(error.get("type")), fallback)
    return (refine_bad_request(kind, str(message or "")), str(message) if message else None)


def http_error(provider: str, status: int, raw: bytes) -> SwitchyardError:
    """Anthropic error bodies: {"type": "error", "error": {"type", "message"}}."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    kind, message = _classify(error, kind_of_status(status))
    if message is None:
        message = raw[:200].decode(errors="replace") if error is None and raw else ""
    return provider_error(kind, provider, message or f"HTTP {status}")


def stream_error(provider: str, data: dict[str, Any]) -> SwitchyardError:
    """An `error` event mid-stream: the status was already 200, so only its type tells."""
    kind, message = _classify(data.get("error"), Kind.SERVER_ERROR)
    return provider_error(kind, provider, message or "stream error")
