"""What every provider dialect shares: the route it is called on, the usage it reports, the
interface the router calls, and an SSE reader with an idle-gap timeout.

Every dialect speaks OpenAI Chat Completions to the router: it takes an OpenAI request body
and returns an OpenAI `chat.completion` object, or yields OpenAI `chat.completion.chunk`
objects whose last one carries `usage` (with empty `choices`). Translation lives entirely
inside the dialect module."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp

from topics.errors import SwitchyardError
from workers.providers.errors import timed_out, transport_error


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = 5.0
    ttft_s: float = 60.0  # request sent → first byte of the answer
    idle_s: float = 30.0  # longest silence between two stream events
    total_s: float = 300.0


@dataclass(frozen=True, slots=True)
class Route:
    provider: str
    dialect: str
    base_url: str
    api_key: str | None
    upstream_model: str
    timeouts: Timeouts = Timeouts()


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    def to_openai(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens}}

    @staticmethod
    def from_openai(usage: dict[str, Any] | None) -> Usage | None:
        if not usage:
            return None
        prompt = usage.get("prompt_tokens_details") or {}
        completion = usage.get("completion_tokens_details") or {}
        return Usage(prompt_tokens=int(usage.get("prompt_tokens") or 0),
                     completion_tokens=int(usage.get("completion_tokens") or 0),
                     cached_tokens=int(prompt.get("cached_tokens") or 0),
                     reasoning_tokens=int(completion.get("reasoning_tokens") or 0))


class Dialect(Protocol):
    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        """One OpenAI `chat.completion` object for an OpenAI request body."""
        ...

    def stream(self, route: Route, body: dict[str, Any],
               request_id: str) -> AsyncGenerator[dict[str, Any], None]:
        """OpenAI `chat.completion.chunk` objects; the last carries `usage`. Raises a
        SwitchyardError if the provider's stream ends before it is complete."""
        ...


@runtime_checkable
class Embedder(Protocol):
    """A dialect whose provider also serves embeddings (not every one does)."""

    async def embed(self, route: Route, body: dict[str, Any],
                    request_id: str) -> dict[str, Any]:
        """An OpenAI embeddings response for an OpenAI embeddings request. If the provider
        reports no usage, the dict carries `"usage_estimated": True`."""
        ...


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str | None
    data: bytes


async def sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[SseEvent]:
    """Server-sent events of a response, each `data` joined across its lines."""
    event: str | None = None
    data: list[bytes] = []
    while True:
        line = await resp.content.readline()
        if not line:  # end of body
            if data:
                yield SseEvent(event, b"\n".join(data))
            return
        line = line.rstrip(b"\r\n")
        if not line:
            if data:
                yield SseEvent(event, b"\n".join(data))
            event, data = None, []
        elif line.startswith(b"data:"):
            data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            event = line[6:].strip().decode()
        # comments (":") and other fields (id, retry) carry nothing we use


ErrorReader = Callable[[str, int, bytes], SwitchyardError]


async def provider_events(route: Route,
                          open_response: Callable[[], AbstractAsyncContextManager[
                              aiohttp.ClientResponse]],
                          http_error: ErrorReader) -> AsyncIterator[SseEvent]:
    """The events of a provider's streamed answer under the route's timeouts: the first
    event within `ttft_s`, each next one within `idle_s`, all within `total_s`. Transport
    failures and timeouts come out as our errors; a non-200 status through `http_error`.

    The deadlines wrap only this generator's own awaits, never a `yield`: a deadline must not
    fire while the caller is busy with an event (it would surface there as a cancellation)."""
    loop = asyncio.get_running_loop()
    t = route.timeouts
    end = loop.time() + t.total_s
    phase, deadline = "first token", min(loop.time() + t.ttft_s, end)
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout_at(deadline):
                resp = await stack.enter_async_context(open_response())
                if resp.status != 200:
                    raise http_error(route.provider, resp.status, await resp.read())
            events = sse_events(resp)
            while True:
                async with asyncio.timeout_at(deadline):
                    event = await anext(events, None)
                if event is None:
                    return
                phase, deadline = "next chunk", min(loop.time() + t.idle_s, end)
                yield event
    except aiohttp.ClientError as exc:
        raise transport_error(route.provider, exc) from exc
    except TimeoutError as exc:
        raise timed_out(route.provider, phase) from exc
