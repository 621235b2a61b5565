"""The OpenAI Chat Completions wire protocol (OpenAI and every compatible server).

One pooled aiohttp session per process is passed in; this module only speaks the protocol
and translates its failures into our exception tree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson

from topics.errors import (
    GatewayTimeout,
    InvalidRequest,
    RateLimited,
    SwitchyardError,
    UpstreamError,
)


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    base_url: str
    api_key: str | None
    upstream_model: str


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @staticmethod
    def from_openai(usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        details = usage.get("prompt_tokens_details") or {}
        return Usage(
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or 0),
            cached_tokens=int(details.get("cached_tokens") or 0),
        )


class OpenAICompat:
    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def complete(self, route: Route, body: dict[str, Any], request_id: str) -> dict[str, Any]:
        payload = {**body, "model": route.upstream_model, "stream": False}
        payload.pop("stream_options", None)
        try:
            async with self._session.post(
                f"{route.base_url}/chat/completions", data=orjson.dumps(payload),
                headers=_headers(route, request_id),
            ) as resp:
                raw = await resp.read()
                if resp.status != 200:
                    raise _http_error(route, resp.status, raw)
        except aiohttp.ClientError as exc:
            raise _transport_error(route, exc) from exc
        except TimeoutError as exc:
            raise GatewayTimeout(f"{route.provider} did not answer in time",
                                 code="upstream_timeout") from exc
        try:
            result: dict[str, Any] = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise UpstreamError(f"{route.provider} sent a response that is not JSON",
                                code="upstream_bad_response") from exc
        return result

    async def stream(
        self, route: Route, body: dict[str, Any], request_id: str
    ) -> AsyncIterator[dict[str, Any]]:
        """Yield each chunk object; raise if the stream ends without `data: [DONE]`."""
        # Usage is always requested upstream: billing needs it even if the client did not ask.
        payload = {**body, "model": route.upstream_model, "stream": True,
                   "stream_options": {**(body.get("stream_options") or {}),
                                      "include_usage": True}}
        try:
            async with self._session.post(
                f"{route.base_url}/chat/completions", data=orjson.dumps(payload),
                headers=_headers(route, request_id),
            ) as resp:
                if resp.status != 200:
                    raise _http_error(route, resp.status, await resp.read())
                async for line in resp.content:
                    if not line.startswith(b"data:"):
                        continue  # blank separators, comments, event names
                    data = line[5:].strip()
                    if data == b"[DONE]":
                        return
                    try:
                        yield orjson.loads(data)
                    except orjson.JSONDecodeError as exc:
                        raise UpstreamError(f"{route.provider} sent a malformed stream event",
                                            code="upstream_bad_response") from exc
        except aiohttp.ClientError as exc:
            raise _transport_error(route, exc) from exc
        except TimeoutError as exc:
            raise GatewayTimeout(f"{route.provider} stalled mid-answer",
                                 code="upstream_timeout") from exc
        raise UpstreamError(f"{route.provider} ended the stream before it was complete",
                            code="upstream_stream_cut")


def _headers(route: Route, request_id: str) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "X-Client-Request-Id": request_id}
    if route.api_key:
        headers["Authorization"] = f"Bearer {route.api_key}"
    return headers


def _http_error(route: Route, status: int, raw: bytes) -> SwitchyardError:
    message = _provider_message(raw) or f"HTTP {status}"
    text = f"{route.provider}: {message}"
    if status == 429:
        return RateLimited(text, code="upstream_rate_limited")
    if status in (400, 404, 422):
        return InvalidRequest(text, code="upstream_rejected")
    if status in (401, 403):
        return UpstreamError(text, code="upstream_auth")
    if status in (408, 504):
        return GatewayTimeout(text, code="upstream_timeout")
    return UpstreamError(text, code="upstream_error")


def _provider_message(raw: bytes) -> str | None:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return raw[:200].decode(errors="replace") or None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message") or "")
    return None


def _transport_error(route: Route, exc: aiohttp.ClientError) -> SwitchyardError:
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamError(f"{route.provider} cut the connection mid-answer",
                             code="upstream_stream_cut")
    return UpstreamError(f"{route.provider} unreachable: {exc}", code="upstream_unreachable")
