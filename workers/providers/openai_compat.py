"""The OpenAI Chat Completions wire protocol: OpenAI, xAI, Mistral, DeepSeek, Kimi, Qwen,
MiniMax, Groq, Together, and any compatible server (vLLM, Ollama, LM Studio).

The request is passed through as the client sent it (unknown fields included), with the
upstream model name; usage is always requested on streams, because billing needs it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp
import orjson

from topics.errors import SwitchyardError, UpstreamError
from workers.providers.base import Route, provider_events
from workers.providers.errors import (
    Kind,
    kind_of_status,
    provider_error,
    stream_cut,
    timed_out,
    transport_error,
)


class OpenAICompat:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        payload = {**body, "model": route.upstream_model, "stream": False}
        payload.pop("stream_options", None)
        return await self._call(route, "/chat/completions", payload, request_id)

    async def embed(self, route: Route, body: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        return await self._call(route, "/embeddings", {**body, "model": route.upstream_model},
                                request_id)

    async def _call(self, route: Route, path: str, payload: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        try:
            async with asyncio.timeout(route.timeouts.total_s), self._post(
                    route, payload, request_id, path) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise http_error(route.provider, resp.status, raw)
        except aiohttp.ClientError as exc:
            raise transport_error(route.provider, exc) from exc
        except TimeoutError as exc:
            raise timed_out(route.provider, "answer") from exc
        try:
            result: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{route.provider} sent a response that is not JSON",
                                code="upstream_bad_response") from exc
        return result

    async def stream(self, route: Route, body: dict[str, Any],
                     request_id: str) -> AsyncGenerator[dict[str, Any], None]:
        payload = {**body, "model": route.upstream_model, "stream": True,
                   "stream_options": {**(body.get("stream_options") or {}),
                                      "include_usage": True}}
        async for event in provider_events(
                route, lambda: self._post(route, payload, request_id), http_error):
            if event.data == b"[DONE]":
                return
            yield _chunk(route, event.data)
        raise stream_cut(route.provider)

    def _post(self, route: Route, payload: dict[str, Any], request_id: str,
              path: str = "/chat/completions") -> Any:
        headers = {"Content-Type": "application/json", "X-Client-Request-Id": request_id}
        if route.api_key:
            headers["Authorization"] = f"Bearer {route.api_key}"
        return self._session.post(
            f"{route.base_url}{path}", data=orjson.dumps(payload), headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=route.timeouts.connect_s))


def _chunk(route: Route, data: bytes) -> dict[str, Any]:
    try:
        chunk: dict[str, Any] = orjson.loads(data)
    except orjson.JSONDecodeError as exc:
        raise UpstreamError(f"{route.provider} sent a malformed stream event",
                            code="upstream_bad_response") from exc
    if isinstance(chunk.get("error"), dict):  # some servers report failures in-stream
        raise provider_error(kind_of_status(500), route.provider,
                             str(chunk["error"].get("message") or "stream error"))
    return chunk


def http_error(provider: str, status: int, raw: bytes) -> SwitchyardError:
    """OpenAI-style error bodies: {"error": {"message", "type", "code"}}."""
    message = f"HTTP {status}"
    try:
        body = orjson.loads(raw)
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            message = str(body["error"].get("message") or message)
    except orjson.JSONDecodeError:
        message = raw[:200].decode(errors="replace") or message
    kind = kind_of_status(status)
    if kind is Kind.BAD_REQUEST and "content" in message.lower() and "filter" in message.lower():
        kind = Kind.CONTENT_FILTERED  # e.g. Azure's content_filter refusals
    return provider_error(kind, provider, message)
