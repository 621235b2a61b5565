"""What the fake upstream answers, independent of any wire dialect.

Each dialect module (`fake_upstream` for OpenAI, `fake_anthropic`, `fake_gemini`) parses its
own request into `Ask`, calls `admit` then `plan`, and renders the `Plan` in its own format.
So one set of knobs (latency, errors, outage, mid-stream cut, tool calls, cached tokens)
drives all three, and a test can predict the answer of any of them."""

from __future__ import annotations

import asyncio
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from aiohttp import web
from pydantic import ValidationError

from compose.fake_judge import verdict
from compose.fake_state import CONFIG_HEADER, REQUEST_ID_HEADER, STATE_KEY, FakeConfig, FakeStats

# Bounds how late a disconnect is noticed when the runner does not cancel handlers.
_POLL_S = 0.1
# An event a broken server sends mid-stream: its data is not JSON.
_MALFORMED = b'data: {"id": "broken", "choices": [{"delta": {"content": "trunc\n\n'
# Where a fixed answer splits into streamed pieces: after each run of spaces.
_WORD_END = re.compile(r"(?<= )(?=[^ ])")


@dataclass(frozen=True, slots=True)
class Failure:
    """An injected (or request-format) failure; each dialect renders it in its error shape."""

    status: int
    kind: Literal["overloaded", "server_error", "rate_limited", "bad_request",
                  "context_length", "content_filter"]
    message: str
    # How it shows: an error status, or (for injected faults) a reset or a hang.
    mode: Literal["status", "reset", "hang"] = "status"
    retry_after: str | None = None  # the Retry-After header of an error status


@dataclass(frozen=True, slots=True)
class Ask:
    """The parts of a request, in any dialect, that decide the fake's answer."""

    last_user_text: str
    all_texts: list[str]  # every text part of every message, system included
    tools: list[str] = field(default_factory=list)  # declared function names, in order
    tool_choice: str | None = None  # None/"auto", "none", "required"/"any", or a name
    json_mode: bool = False
    max_tokens: int | None = None
    after_tool_result: bool = False  # the last message carries a tool result
    prefill: bool = False  # the conversation ends with an assistant message to continue


@dataclass(frozen=True, slots=True)
class Plan:
    kind: Literal["text", "tool_call", "json"]
    pieces: list[str]  # streamed one per chunk: text tokens, or tool-argument JSON pieces
    finish: Literal["stop", "length", "tool_call"]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    tool_name: str | None = None
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def admit(request: web.Request, model: str | None) -> tuple[FakeConfig, FakeStats] | Failure:
    """Count the call, work out its knobs, and inject outages and errors.

    The knobs are, most specific last: the fake's config, the `per_model` entry of the
    (upstream) `model`, the request's `x-fake-config` header. The returned config's `ttft_ms`
    is this call's own wait, drawn here so that the seeded sequence follows call order."""
    state = request.app[STATE_KEY]
    stats = state.stats
    stats.requests_total += 1
    headers = request.headers
    request[_CALL_KEY] = stats.log_call(model, headers.get(REQUEST_ID_HEADER),
                                        request.content_length)
    if (rid := headers.get(REQUEST_ID_HEADER)) is not None:
        stats.calls_by_request_id[rid] = stats.calls_by_request_id.get(rid, 0) + 1
    if model is not None:
        stats.calls_by_model[model] = stats.calls_by_model.get(model, 0) + 1
    for name in ("Authorization", "x-api-key", "x-goog-api-key"):
        if (value := headers.get(name)) is not None:
            stats.last_authorization = value
    cfg = state.config
    try:
        override = orjson.loads(headers.get(CONFIG_HEADER) or "{}")
        if not isinstance(override, dict):
            raise ValueError(f"{CONFIG_HEADER} must be a JSON object")
        if override:
            cfg = cfg.merged(override)  # first, as the header may set per_model itself
        if model is not None and (patch := cfg.per_model.get(model)):
            cfg = cfg.merged({**patch, **override})
    except (ValueError, ValidationError) as exc:
        stats.errors_sent += 1
        return Failure(400, "bad_request", f"bad {CONFIG_HEADER}: {exc}")
    if cfg.outage:
        stats.errors_sent += 1
        return _logged(request, Failure(503, "overloaded",
                                        "The service is overloaded, try again later.",
                                        retry_after=cfg.retry_after))
    if cfg.fail_first > state.failed_first.get(model or "", 0):
        state.failed_first[model or ""] = state.failed_first.get(model or "", 0) + 1
        stats.errors_sent += 1
        return _logged(request, _injected(cfg))
    if cfg.error_rate > 0 and state.rng.random() < cfg.error_rate:
        stats.errors_sent += 1
        return _logged(request, _injected(cfg))
    # No draw at all with the tail off, so seeded runs replay as they did before it existed.
    ttft = cfg.ttft_ms
    if cfg.ttft_sigma > 0:
        ttft *= math.exp(state.rng.gauss(0, cfg.ttft_sigma))
    if cfg.slow_rate > 0 and state.rng.random() < cfg.slow_rate:
        ttft *= cfg.slow_factor
    if ttft != cfg.ttft_ms:
        cfg = cfg.model_copy(update={"ttft_ms": ttft})
    return cfg, stats


def _injected(cfg: FakeConfig) -> Failure:
    kind: Literal["rate_limited", "server_error"] = (
        "rate_limited" if cfg.error_status == 429 else "server_error")
    return Failure(cfg.error_status, kind,
                   "The server had an error while processing your request. Sorry about that!",
                   mode=cfg.fail_mode, retry_after=cfg.retry_after)


_CALL_KEY = web.RequestKey("fake_call", dict[str, Any])


def _logged(request: web.Request, failure: Failure) -> Failure:
    request[_CALL_KEY]["fault"] = (f"status {failure.status}" if failure.mode == "status"
                                   else failure.mode)
    return failure


def failing(request: web.Request, cfg: FakeConfig, stats: FakeStats,
            model: str) -> Failure | None:
    """The injected failure for a model listed in `fail_models`, else None."""
    if model not in cfg.fail_models:
        return None
    stats.errors_sent += 1
    return _logged(request, _injected(cfg))


Dialect = Literal["openai", "anthropic", "gemini"]

# What each provider says, word for word where it documents it.
_CONTEXT = {
    "openai": "This model's maximum context length is {window} tokens. However, your messages "
              "resulted in {tokens} tokens. Please reduce the length of the messages.",
    "anthropic": "prompt is too long: {tokens} tokens > {window} maximum",
    "gemini": "The input token count ({tokens}) exceeds the maximum number of tokens allowed "
              "({window}).",
}
_FILTERED = {
    "openai": "The response was filtered due to the prompt triggering the content management "
              "policy. Please modify your prompt and retry.",
    "anthropic": "Output blocked by content filtering policy",
    "gemini": "The request was blocked by the content policy.",
}
_PREFILL = ("This model does not support assistant message prefill. The conversation must end "
            "with a user message.")


def refusing(request: web.Request, cfg: FakeConfig, stats: FakeStats, ask: Ask, plan_: Plan,
             dialect: Dialect) -> Failure | None:
    """The 400 a model that cannot take this request answers (`context_window`,
    `content_filter`, `rejects_prefill`), else None."""
    failure = None
    if cfg.content_filter:
        failure = Failure(400, "content_filter", _FILTERED[dialect])
    elif cfg.rejects_prefill and ask.prefill:
        failure = Failure(400, "bad_request", _PREFILL)
    elif cfg.context_window is not None and plan_.prompt_tokens > cfg.context_window:
        failure = Failure(400, "context_length", _CONTEXT[dialect].format(
            window=cfg.context_window, tokens=plan_.prompt_tokens))
    if failure is None:
        return None
    stats.errors_sent += 1
    return _logged(request, failure)


async def fail(request: web.Request, stats: FakeStats, failure: Failure,
               respond: Callable[[Failure], web.Response]) -> web.StreamResponse:
    """Act a failure out: `respond` renders an error status in the dialect's own shape (with
    the failure's Retry-After); a reset closes the connection before any response; a hang
    answers nothing until the client leaves."""
    if failure.mode == "reset":
        if request.transport is not None:
            request.transport.abort()
        return web.Response(status=499)  # nobody left to read it: aiohttp drops it quietly
    if failure.mode == "hang" and not await answer_ready(request, stats, cfg=None):
        return web.Response(status=499)
    response = respond(failure)
    if failure.retry_after is not None:
        response.headers["Retry-After"] = failure.retry_after
    return response


def plan(cfg: FakeConfig, ask: Ask) -> Plan:
    word = (ask.last_user_text.split(maxsplit=1) or ["empty"])[0]
    prompt = cfg.prompt_tokens_override
    if prompt is None:
        prompt = sum(len(t.split()) + 4 for t in ask.all_texts)
    cached = min(cfg.cached_tokens, prompt)
    wants_tool = (ask.tools and ask.tool_choice != "none" and not ask.after_tool_result)
    if wants_tool:
        name = ask.tool_choice if ask.tool_choice in ask.tools else ask.tools[0]
        arguments = orjson.dumps({"query": word}).decode()
        pieces = _split(arguments, 3)
        return Plan("tool_call", pieces, "tool_call", prompt, len(pieces), cached,
                    tool_name=name, tool_call_id=f"call_{word}_{len(ask.all_texts)}")
    judged = verdict(ask.last_user_text, cfg.judge_key) if cfg.judge_key is not None else None
    if judged is not None:
        # Never cut at max_tokens, like a JSON-mode document: the verdict must always parse.
        pieces = _words(judged)
        return Plan("text", pieces, "stop", prompt, len(pieces), cached)
    if ask.json_mode:
        document = orjson.dumps({"word": word, "tokens": cfg.tokens}).decode()
        pieces = _split(document, 4)
        return Plan("json", pieces, "stop", prompt, len(pieces), cached)
    pieces = _words(cfg.answer) if cfg.answer is not None else [
        f"{word}-{i} " for i in range(cfg.tokens)]
    finish: Literal["stop", "length"] = "stop"
    if ask.max_tokens is not None and 0 <= ask.max_tokens < len(pieces):
        pieces, finish = pieces[:ask.max_tokens], "length"
    return Plan("text", pieces, finish, prompt, len(pieces), cached)


def _words(text: str) -> list[str]:
    """`text` in pieces, each word with the spaces after it, so they join back to `text`."""
    return [piece for piece in _WORD_END.split(text) if piece]


def _split(text: str, parts: int) -> list[str]:
    size = max(1, -(-len(text) // parts))
    return [text[i:i + size] for i in range(0, len(text), size)]


async def pause(request: web.Request, ms: float) -> None:
    """Sleep, but notice a vanished client even if the runner does not cancel handlers."""
    if ms <= 0:
        return
    deadline = time.monotonic() + ms / 1000
    while (left := deadline - time.monotonic()) > 0:
        await asyncio.sleep(min(left, _POLL_S))
        transport = request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")


async def answer_ready(request: web.Request, stats: FakeStats,
                       cfg: FakeConfig | None) -> bool:
    """Wait `ttft_ms` (None: an hour) before a non-streamed answer; False if the client left
    meanwhile (counted). The caller then returns a 499, which lets aiohttp drop the dead
    connection quietly (raising would log a 500)."""
    try:
        await pause(request, 3_600_000 if cfg is None else cfg.ttft_ms)
    except ConnectionResetError:
        stats.disconnects += 1
        return False
    except asyncio.CancelledError:
        stats.disconnects += 1
        raise
    return True


async def send_stream(request: web.Request, resp: web.StreamResponse, stats: FakeStats,
                      cfg: FakeConfig, opening: list[bytes], pieces: list[bytes],
                      closing: list[bytes]) -> web.StreamResponse:
    """Stream an answer as a provider does: after `ttft_ms` the opening events with the first
    piece, then one piece every `inter_token_ms` (pieces due together leave in one write),
    then the closing events. With `cut_after_tokens`, the connection is aborted after that
    many pieces, closing events unsent. With `malformed_after_tokens`, events that are not
    JSON come after that many pieces; with `omit_done`, the last closing event (the stream's
    terminator) is left out. A client that leaves is counted, promptly."""
    stats.open_streams += 1
    try:
        await pause(request, cfg.ttft_ms)
        await resp.prepare(request)
        pending = list(opening)
        if cfg.omit_done:
            closing = closing[:-1]
        for i, piece in enumerate(pieces):
            if i == cfg.cut_after_tokens:
                break
            if i == cfg.malformed_after_tokens:
                pending.extend([_MALFORMED] * cfg.malformed_events)
            if i > 0 and cfg.inter_token_ms > 0:
                await resp.write(b"".join(pending))
                pending.clear()
                await pause(request, cfg.inter_token_ms)
            pending.append(piece)
        if cfg.cut_after_tokens is not None:
            await resp.write(b"".join(pending))
            # Abort (not close) so the client sees a truncated chunked body, like a crash.
            if request.transport is not None:
                request.transport.abort()
            stats.cut_streams += 1
            return resp
        await resp.write(b"".join(pending + closing))
        await resp.write_eof()
        stats.completed_streams += 1
        return resp
    except ConnectionResetError:
        stats.disconnects += 1
        return resp
    except asyncio.CancelledError:
        stats.disconnects += 1
        raise
    finally:
        stats.open_streams -= 1
