"""What every provider dialect shares: the route it is called on, the usage it reports, the
interface the router calls, and an SSE reader with an idle-gap timeout.

Every dialect speaks OpenAI Chat Completions to the router: it takes an OpenAI request body
and returns an OpenAI `chat.completion` object, or yields OpenAI `chat.completion.chunk`
objects whose last one carries `usage` (with empty `choices`). Translation lives entirely
inside the dialect module. A whole answer's `message.content` is always a string (`""` where
OpenAI writes null beside tool calls): see `text_content`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import aiohttp
import orjson

from topics.errors import SwitchyardError, UpstreamError
from topics.settings import RouterSettings, default
from workers.providers.errors import timed_out, transport_error, with_retry_after

log = logging.getLogger(__name__)

# A stream may carry a malformed event (a `data:` line that is not a JSON object) and stay
# valid: the event is skipped. This many in a row, and the stream is broken.
MAX_MALFORMED_IN_A_ROW = 3

# Told the provider's name each time one of its streams had a malformed event skipped.
MalformedHook = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect_s: float = default(RouterSettings, "upstream_connect_timeout_s")
    # request sent → first event of a stream, or the response headers of a whole answer
    ttft_s: float = default(RouterSettings, "upstream_ttft_timeout_s")
    # longest silence between two stream events
    idle_s: float = default(RouterSettings, "upstream_idle_timeout_s")
    total_s: float = default(RouterSettings, "upstream_total_timeout_s")

    @classmethod
    def from_settings(cls, router: RouterSettings) -> Timeouts:
        return cls(connect_s=router.upstream_connect_timeout_s,
                   ttft_s=router.upstream_ttft_timeout_s,
                   idle_s=router.upstream_idle_timeout_s,
                   total_s=router.upstream_total_timeout_s)


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


def text_content(completion: dict[str, Any]) -> dict[str, Any]:
    """`completion` (in place) with every choice's `message.content` a string: OpenAI writes
    null for a message that carries only tool calls (or a refusal), and the seed product's Rust
    SDK fails to decode a null there (/work/shared/SEED-API.md); "" means the same to the
    official SDKs. The translating dialects write "" themselves."""
    for choice in completion.get("choices") or ():
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and message.get("content") is None:
            message["content"] = ""
    return completion


class Dialect(Protocol):
    async def complete(self, route: Route, body: dict[str, Any],
                       request_id: str) -> dict[str, Any]:
        """One OpenAI `chat.completion` object for an OpenAI request body; every choice's
        `message.content` a string (`text_content`)."""
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


class SseParser:
    """Bytes in, complete events out; a line or event split across reads waits for the rest."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._event: str | None = None
        self._data: list[bytes] = []

    def feed(self, raw: bytes) -> list[SseEvent]:
        self._buffer += raw
        cut = self._buffer.rfind(b"\n")
        if cut < 0:
            return []
        complete = bytes(self._buffer[:cut])
        del self._buffer[:cut + 1]
        out: list[SseEvent] = []
        for line in complete.split(b"\n"):
            self._line(line.rstrip(b"\r"), out)
        return out

    def end(self) -> list[SseEvent]:
        """The body ended: a last line without its newline, an event without its blank line."""
        out: list[SseEvent] = []
        if self._buffer:
            self._line(bytes(self._buffer).rstrip(b"\r"), out)
            self._buffer.clear()
        self._line(b"", out)
        return out

    def _line(self, line: bytes, out: list[SseEvent]) -> None:
        if not line:
            if self._data:
                out.append(SseEvent(self._event, b"\n".join(self._data)))
            self._event, self._data = None, []
        elif line.startswith(b"data:"):
            self._data.append(line[5:].lstrip(b" "))
        elif line.startswith(b"event:"):
            self._event = line[6:].strip().decode()
        # comments (":") and other fields (id, retry) carry nothing we use


ErrorReader = Callable[[str, int, bytes], SwitchyardError]
Opener = Callable[[], AbstractAsyncContextManager[aiohttp.ClientResponse]]


async def provider_answer(route: Route, open_response: Opener,
                          http_error: ErrorReader) -> bytes:
    """The body of a provider's whole (not streamed) answer under the route's timeouts: the
    response headers within `ttft_s`, the body within `total_s`. Transport failures and
    timeouts come out as our errors; a non-200 status through `http_error`, with the
    response's `Retry-After`."""
    loop = asyncio.get_running_loop()
    t = route.timeouts
    end = loop.time() + t.total_s
    first = loop.time() + t.ttft_s
    phase, answering = ("first byte" if first < end else "answer"), False
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout_at(min(first, end)):
                resp = await stack.enter_async_context(open_response())
            phase, answering = "answer", True
            async with asyncio.timeout_at(end):
                raw = await resp.read()
            if resp.status != 200:
                raise with_retry_after(http_error(route.provider, resp.status, raw),
                                       resp.headers)
            return raw
    except aiohttp.ClientError as exc:
        raise transport_error(route.provider, exc, answering=answering) from exc
    except TimeoutError as exc:
        raise timed_out(route.provider, phase) from exc


async def provider_events(route: Route, open_response: Opener,
                          http_error: ErrorReader) -> AsyncIterator[SseEvent]:
    """The events of a provider's streamed answer under the route's timeouts: the first
    event within `ttft_s`, each next one within `idle_s`, all within `total_s`. Transport
    failures and timeouts come out as our errors; a non-200 status through `http_error`,
    with the response's `Retry-After`.

    Events are parsed a network read at a time (one await per read however many events it
    carried). The deadlines bound only this generator's own waits, never a `yield`: a
    deadline must not fire while the caller is busy with an event."""
    loop = asyncio.get_running_loop()
    t = route.timeouts
    end = loop.time() + t.total_s
    phase, deadline = "first token", min(loop.time() + t.ttft_s, end)
    answering = False
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout_at(deadline):
                resp = await stack.enter_async_context(open_response())
                answering = True
                if resp.status != 200:
                    raise with_retry_after(
                        http_error(route.provider, resp.status, await resp.read()),
                        resp.headers)
            watch = stack.enter_context(ReadWatch(resp.content))
            parser = SseParser()
            while True:
                watch.reading(deadline)
                raw = await resp.content.readany()
                watch.idle()
                events = parser.feed(raw) if raw else parser.end()
                # A read without a whole event (a keep-alive comment, half a line) is not
                # progress: only events push the idle deadline back.
                if events:
                    phase, deadline = "next chunk", min(loop.time() + t.idle_s, end)
                for event in events:
                    yield event
                if not raw:  # end of body
                    return
    except aiohttp.ClientError as exc:
        raise transport_error(route.provider, exc, answering=answering) from exc
    except TimeoutError as exc:
        raise timed_out(route.provider, phase) from exc


class MalformedEvents:
    """The JSON objects of one stream's events, a malformed one skipped: logged (without its
    payload, which is the client's answer), told to `on_malformed`, and forgiven, unless
    more than `MAX_MALFORMED_IN_A_ROW` come in a row (`upstream_bad_stream`)."""

    def __init__(self, provider: str, request_id: str,
                 on_malformed: MalformedHook | None) -> None:
        self._provider = provider
        self._request_id = request_id
        self._on_malformed = on_malformed
        self._in_a_row = 0

    def parse(self, data: bytes) -> dict[str, Any] | None:
        """The event's JSON object, or None if it is to be skipped."""
        try:
            parsed = orjson.loads(data)
        except orjson.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            self._in_a_row = 0
            return parsed
        self._in_a_row += 1
        log.warning("%s sent a malformed stream event (%d bytes, %d in a row) for request %s",
                    self._provider, len(data), self._in_a_row, self._request_id)
        if self._on_malformed is not None:
            self._on_malformed(self._provider)
        if self._in_a_row > MAX_MALFORMED_IN_A_ROW:
            raise UpstreamError(f"{self._provider} sent {self._in_a_row} malformed stream "
                                "events in a row", code="upstream_bad_stream", retryable=True)
        return None


class ReadWatch:
    """The deadline of each read of a stream, on one timer that re-arms itself only when it
    fires early (a timeout scope per read, a timer armed and cancelled each time, was 7 % of a
    streaming router's CPU). A read still waiting at its deadline fails with TimeoutError."""

    def __init__(self, content: aiohttp.StreamReader) -> None:
        self._loop = asyncio.get_running_loop()
        self._content = content
        self._due = math.inf  # the waiting read's deadline; inf while nobody reads
        self._timer: asyncio.TimerHandle | None = None

    def reading(self, due: float) -> None:
        self._due = due
        if self._timer is None or self._timer.when() > due:
            self._arm(due)

    def idle(self) -> None:
        self._due = math.inf

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if self._due <= self._loop.time():
            self._content.set_exception(TimeoutError())
        elif self._due != math.inf:
            self._arm(self._due)

    def __enter__(self) -> ReadWatch:
        return self

    def __exit__(self, *_: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
