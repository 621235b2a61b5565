"""The OpenAI Chat Completions wire protocol: OpenAI, xAI, Mistral, DeepSeek, Kimi, Qwen,
MiniMax, Groq, Together, and any compatible server (vLLM, Ollama, LM Studio).

The request is passed through as the client sent it (unknown fields included), with the
upstream model name (less the client's native Anthropic request a Messages client's body
carries: `topics/anthropic.py`); usage is always requested on streams, because billing
needs it."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from topics.anthropic import without_native
from topics.errors import SwitchyardError, UpstreamError
from workers.providers.base import (
    MalformedEvents,
    MalformedHook,
    Route,
    provider_answer,
    provider_events,
    text_content,
)
from workers.providers.errors import (
    kind_of_status,
    provider_error,
    refine_bad_request,
    stream_cut,
)


class OpenAICompat:
    def __init__(self, session: aiohttp.ClientSession,
                 on_malformed: MalformedHook | None = None) -> None:
        self._session = session
        self._on_malformed = on_malformed

    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        payload = {**without_native(body), "model": route.upstream_model, "stream": False}
        payload.pop("stream_options", None)
        return text_content(await self._call(route, "/chat/completions", payload, request_id))

    async def embed(self, route: Route, body: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        return await self._call(route, "/embeddings", {**body, "model": route.upstream_model},
                                request_id)

    async def _call(self, route: Route, path: str, payload: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        raw = await provider_answer(
            route, lambda: self._post(route, payload, request_id, path), http_error)
        try:
            result: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{route.provider} sent a response that is not JSON",
                                code="upstream_bad_response") from exc
        return result

    async def stream(self, route: Route, body: dict[str, Any],
                     request_id: str) -> AsyncGenerator[dict[str, Any], None]:
        payload = {**without_native(body), "model": route.upstream_model, "stream": True,
                   "stream_options": {**(body.get("stream_options") or {}),
                                      "include_usage": True}}
        events = MalformedEvents(route.provider, request_id, self._on_malformed)
        finished: dict[int, bool] = {}  # each choice seen → whether it has its finish_reason
        async for event in provider_events(
                route, lambda: self._post(route, payload, request_id), http_error):
            if event.data == b"[DONE]":
                return
            chunk = events.parse(event.data)
            if chunk is None:
                continue
            if isinstance(chunk.get("error"), dict):  # some servers report failures in-stream
                raise provider_error(kind_of_status(500), route.provider,
                                     str(chunk["error"].get("message") or "stream error"))
            for choice in chunk.get("choices") or ():
                index = choice.get("index", 0)
                finished[index] = finished.get(index, False) or bool(choice.get("finish_reason"))
            yield chunk
        # Some compatible servers end the body without `[DONE]`: with every choice finished,
        # the answer is whole (its usage came before the end, if at all).
        if not finished or not all(finished.values()):
            raise stream_cut(route.provider)

    def _post(self, route: Route, payload: dict[str, Any], request_id: str,
              path: str = "/chat/completions") -> Any:
        headers = {"Content-Type": "application/json", "X-Client-Request-Id": request_id}
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        return self._session.post(
            f"{route.base_url}{path}", data=orjson.dumps(payload), headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=route.timeouts.connect_s))


def http_error(provider: str, status: int, raw: bytes) -> SwitchyardError:
    """OpenAI-style error bodies: {"error": {"message", "type", "code"}}."""
    message, code = f"HTTP {status}", None
    try:
        body = orjson.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message") or message)
            code = body["error"].get("code")
    except orjson.JSONDecodeError:
        message = raw[:200].decode(errors="replace") or message
    # Azure's content_filter and OpenAI's context_length_exceeded say so in `code`.
    return provider_error(refine_bad_request(kind_of_status(status), message, code), provider,
                          message)
