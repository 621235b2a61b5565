"""The Anthropic Messages dialect against the fake upstream: OpenAI in, Anthropic on the wire,
OpenAI out. Every completion and chunk it returns is parsed by the official `openai` types."""

from __future__ import annotations

import base64
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from compose.fake_scenario import Ask, plan
from compose.fake_state import FakeConfig
from compose.fake_upstream import FakeUpstream
from tests.wire_server import Handler, serving
from topics.errors import (
    GatewayTimeout,
    InvalidRequest,
    RateLimited,
    SwitchyardError,
    Unavailable,
    UpstreamError,
)
from workers.providers.anthropic import (
    AnthropicMessages,
    StreamTranslator,
    http_error,
    to_completion,
    usage_of,
)
from workers.providers.anthropic_translate import (
    DEFAULT_MAX_TOKENS,
    JSON_TOOL,
    to_messages_request,
)
from workers.providers.base import Route, SseEvent, Timeouts

KEY = "sk-ant-test"
MSGS: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hello there world"}]
TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "lookup", "description": "Look a word up.",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=5)) as upstream:
        yield upstream


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def route(fake: FakeUpstream) -> Route:
    return Route("anthropic", "anthropic", fake.url, KEY, "claude-test",
                 Timeouts(connect_s=2, ttft_s=5, idle_s=5, total_s=10))


@pytest.fixture
def dialect(http: aiohttp.ClientSession) -> AnthropicMessages:
    return AnthropicMessages(http)


async def complete(dialect: AnthropicMessages, route: Route, **body: Any) -> dict[str, Any]:
    result = await dialect.complete(route, {"model": "claude", "messages": MSGS, **body}, "r-1")
    ChatCompletion.model_validate(result)
    return result


async def stream(dialect: AnthropicMessages, route: Route, **body: Any) -> list[dict[str, Any]]:
    """All chunks of a stream, each validated; checks the envelope rules every stream keeps."""
    chunks = [c async for c in dialect.stream(
        route, {"model": "claude", "messages": MSGS, "stream": True, **body}, "r-1")]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert len({(c["id"], c["model"], c["created"]) for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] > 0
    assert all(c["choices"] for c in chunks[:-1])
    return chunks


def content_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1])


def finish_of(chunks: list[dict[str, Any]]) -> str:
    finishes = [c["choices"][0]["finish_reason"] for c in chunks[:-1]]
    assert all(f is None for f in finishes[:-1])
    return str(finishes[-1])


def expected(cfg: FakeConfig, last_user: str, texts: list[str], **ask: Any) -> str:
    return plan(cfg, Ask(last_user_text=last_user, all_texts=texts, **ask)).text


# --- text ---------------------------------------------------------------------------------


async def test_text_completion(dialect: AnthropicMessages, route: Route,
                               fake: FakeUpstream) -> None:
    result = await complete(dialect, route)
    choice = result["choices"][0]
    assert choice["message"]["content"] == expected(fake.config, "hello there world",
                                                    ["be brief", "hello there world"])
    assert choice["message"]["content"] == "hello-0 hello-1 hello-2 hello-3 hello-4 "
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert result["id"].startswith("msg_")
    assert result["model"] == "claude-test"
    assert result["usage"]["prompt_tokens"] == 13
    assert result["usage"]["completion_tokens"] == 5
    assert fake.stats.last_authorization == KEY  # sent as x-api-key
    assert fake.stats.calls_by_request_id == {"r-1": 1}


async def test_text_stream(dialect: AnthropicMessages, route: Route,
                           fake: FakeUpstream) -> None:
    chunks = await stream(dialect, route)
    assert content_of(chunks) == "hello-0 hello-1 hello-2 hello-3 hello-4 "
    assert finish_of(chunks) == "stop"
    assert chunks[-2]["choices"][0]["delta"] == {}
    assert chunks[-1]["usage"]["prompt_tokens"] == 13
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert fake.stats.completed_streams == 1


async def test_max_tokens_gives_length(dialect: AnthropicMessages, route: Route) -> None:
    result = await complete(dialect, route, max_completion_tokens=2)
    assert result["choices"][0]["finish_reason"] == "length"
    assert result["choices"][0]["message"]["content"] == "hello-0 hello-1 "
    assert finish_of(await stream(dialect, route, max_tokens=3)) == "length"


async def test_request_headers_and_path(http: aiohttp.ClientSession) -> None:
    seen: list[web.Request] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m",
            "content": [{"type": "text", "text": "ok"}], "stop_reason": "end_turn",
            "stop_sequence": None, "usage": {"input_tokens": 1, "output_tokens": 1}})

    async with _server(handler) as base:
        target = Route("anthropic", "anthropic", base, KEY, "m")
        await complete(AnthropicMessages(http), target)
    [request] = seen
    assert request.path == "/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["X-Client-Request-Id"] == "r-1"
    assert "Authorization" not in request.headers


# --- multi-part ----------------------------------------------------------------------------


async def test_multipart_content(dialect: AnthropicMessages, route: Route,
                                 fake: FakeUpstream) -> None:
    parts = [{"type": "text", "text": "look"},
             {"type": "image_url", "image_url": {"url": "https://example.com/a.png",
                                                 "detail": "high"}},
             {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
             {"type": "text", "text": "here"}]
    messages = [{"role": "user", "content": parts}]
    result = await complete(dialect, route, messages=messages)
    want = expected(fake.config, "lookhere", ["look", "here"])
    assert result["choices"][0]["message"]["content"] == want
    assert content_of(await stream(dialect, route, messages=messages)) == want


# --- tools ---------------------------------------------------------------------------------


async def test_tool_call_out(dialect: AnthropicMessages, route: Route) -> None:
    result = await complete(dialect, route, tools=TOOLS)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == ""  # a string, never null (the Rust SDK)
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("toolu_")
    assert call["type"] == "function"
    assert call["function"]["name"] == "lookup"
    assert orjson.loads(call["function"]["arguments"]) == {"query": "hello"}


async def test_tool_call_streamed(dialect: AnthropicMessages, route: Route) -> None:
    chunks = await stream(dialect, route, tools=TOOLS,
                          tool_choice={"type": "function", "function": {"name": "lookup"}})
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks[:-1]
             if c["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"].startswith("toolu_")
    assert calls[0]["type"] == "function"
    assert calls[0]["function"] == {"name": "lookup", "arguments": ""}
    assert all(call["index"] == 0 for call in calls)
    arguments = "".join(call["function"]["arguments"] for call in calls)
    assert len(calls) > 2
    assert orjson.loads(arguments) == {"query": "hello"}
    assert finish_of(chunks) == "tool_calls"
    assert content_of(chunks) == ""


async def test_tool_results_in(dialect: AnthropicMessages, route: Route,
                               fake: FakeUpstream) -> None:
    first = await complete(dialect, route, tools=TOOLS)
    message = first["choices"][0]["message"]
    call = message["tool_calls"][0]
    history = [*MSGS, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": call["id"], "content": "a greeting"}]
    result = await complete(dialect, route, messages=history, tools=TOOLS)
    # After a tool result the fake answers in text, following the last user text.
    assert result["choices"][0]["finish_reason"] == "stop"
    want = expected(fake.config, "hello there world", ["be brief", "hello there world",
                                                       "a greeting"])
    assert result["choices"][0]["message"]["content"] == want
    assert content_of(await stream(dialect, route, messages=history, tools=TOOLS)) == want


async def test_tool_choice_none_answers_in_text(dialect: AnthropicMessages,
                                                route: Route) -> None:
    result = await complete(dialect, route, tools=TOOLS, tool_choice="none")
    assert result["choices"][0]["finish_reason"] == "stop"
    assert result["choices"][0]["message"]["content"].startswith("hello-0")


def test_stream_tool_indices_are_ordinals_and_thinking_is_reasoning() -> None:
    translator = StreamTranslator(Route("anthropic", "anthropic", "x", None, "m"), None)
    events: list[dict[str, Any]] = [
        {"type": "message_start", "message": {"id": "msg_9", "model": "claude-x", "usage": {
            "input_tokens": 7, "cache_creation_input_tokens": 2, "cache_read_input_tokens": 3,
            "output_tokens": 1}}},
        {"type": "content_block_start", "index": 0,
         "content_block": {"type": "thinking", "thinking": "", "signature": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "thinking_delta", "thinking": "hmm"}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "signature_delta", "signature": "sig"}},
        {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Hi"}},
        *[e for i, name in ((2, "a"), (3, "b")) for e in (
            {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": f"toolu_{name}", "name": name, "input": {}}},
            {"type": "content_block_delta", "index": i,
             "delta": {"type": "input_json_delta", "partial_json": '{"k": '}},
            {"type": "content_block_delta", "index": i,
             "delta": {"type": "input_json_delta", "partial_json": f'"{name}"}}'}},
            {"type": "content_block_stop", "index": i})],
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"},
         "usage": {"output_tokens": 20, "output_tokens_details": {"thinking_tokens": 4}}},
        {"type": "message_stop"}]
    chunks = [c for e in events
              for c in translator.feed(SseEvent(e["type"], orjson.dumps(e)))]
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert translator.done
    deltas = [c["choices"][0]["delta"] for c in chunks[:-1]]
    assert [d["reasoning_content"] for d in deltas if "reasoning_content" in d] == ["hmm"]
    assert "".join(d.get("content") or "" for d in deltas) == "Hi"
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [c["index"] for c in calls] == [0, 0, 0, 1, 1, 1]  # block indices were 2 and 3
    assert "".join(c["function"]["arguments"] for c in calls if c["index"] == 1) == '{"k": "b"}'
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["id"] == "msg_9"
    assert chunks[-1]["model"] == "claude-x"
    assert chunks[-1]["usage"]["prompt_tokens"] == 12  # input + cache writes + cache reads
    assert chunks[-1]["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    assert chunks[-1]["usage"]["completion_tokens"] == 20
    assert chunks[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 4}


def test_completion_blocks_and_stop_reasons() -> None:
    message = {"id": "msg_2", "model": "claude-x", "stop_reason": "refusal", "content": [
        {"type": "thinking", "thinking": "let me see", "signature": "s"},
        {"type": "redacted_thinking", "data": "opaque"},
        {"type": "text", "text": "I can"}, {"type": "text", "text": "not."}],
        "usage": {"input_tokens": 3, "output_tokens": 4}}
    result = to_completion(Route("anthropic", "anthropic", "x", None, "m"), message, None)
    ChatCompletion.model_validate(result)
    choice = result["choices"][0]
    assert choice["message"]["content"] == "I cannot."
    assert choice["message"]["reasoning_content"] == "let me see"
    assert choice["finish_reason"] == "content_filter"
    for stop, finish in (("end_turn", "stop"), ("stop_sequence", "stop"),
                         ("max_tokens", "length"), ("model_context_window_exceeded", "length")):
        done = to_completion(Route("a", "anthropic", "x", None, "m"),
                             {**message, "stop_reason": stop}, None)
        assert done["choices"][0]["finish_reason"] == finish


def test_error_bodies_that_are_not_anthropic_json() -> None:
    gateway = http_error("anthropic", 502, b"<html>Bad Gateway</html>")
    assert gateway.code == "upstream_server_error"
    assert gateway.message == "anthropic: <html>Bad Gateway</html>"
    overloaded = http_error("anthropic", 529, b"")
    assert overloaded.code == "upstream_overloaded"
    assert overloaded.message == "anthropic: HTTP 529"
    typed = http_error("anthropic", 400, orjson.dumps({"type": "error", "error": {
        "type": "request_too_large", "message": "Request exceeds the maximum size"}}))
    assert typed.code == "upstream_bad_request"
    assert typed.message == "anthropic: Request exceeds the maximum size"


# --- JSON mode -----------------------------------------------------------------------------


async def test_json_object_via_forced_tool(dialect: AnthropicMessages, route: Route) -> None:
    result = await complete(dialect, route, response_format={"type": "json_object"})
    choice = result["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert "tool_calls" not in choice["message"]
    assert orjson.loads(choice["message"]["content"]) == {"query": "hello"}
    chunks = await stream(dialect, route, response_format={"type": "json_object"})
    assert orjson.loads(content_of(chunks)) == {"query": "hello"}
    assert finish_of(chunks) == "stop"


async def test_json_schema_native(dialect: AnthropicMessages, route: Route) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "word", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "required": ["word", "tokens"],
        "properties": {"word": {"type": "string"}, "tokens": {"type": "integer"}}}}}
    result = await complete(dialect, route, response_format=fmt)
    assert orjson.loads(result["choices"][0]["message"]["content"]) == {"word": "hello",
                                                                        "tokens": 5}
    chunks = await stream(dialect, route, response_format=fmt)
    assert orjson.loads(content_of(chunks)) == {"word": "hello", "tokens": 5}
    assert finish_of(chunks) == "stop"


async def test_json_object_with_tools_may_still_call_them(dialect: AnthropicMessages,
                                                          route: Route) -> None:
    result = await complete(dialect, route, tools=TOOLS, response_format={"type": "json_object"})
    [call] = result["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "lookup"  # the fake picks the first declared tool


# --- usage ---------------------------------------------------------------------------------


async def test_usage_with_cached_tokens(dialect: AnthropicMessages, route: Route,
                                        fake: FakeUpstream) -> None:
    fake.configure(prompt_tokens_override=50, cached_tokens=20)
    want = {"prompt_tokens": 50, "completion_tokens": 5, "total_tokens": 55,
            "prompt_tokens_details": {"cached_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 0}}
    assert (await complete(dialect, route))["usage"] == want
    assert (await stream(dialect, route))[-1]["usage"] == want


def test_usage_counts_cache_writes_as_prompt() -> None:
    usage = usage_of({"input_tokens": 5, "cache_creation_input_tokens": 100,
                      "cache_read_input_tokens": 7, "output_tokens": 9})
    assert (usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens) == (112, 7, 9)


# --- errors --------------------------------------------------------------------------------


ERRORS = [  # knobs → our class, code, retryable, HTTP status we answer with
    ({"outage": True}, Unavailable, "upstream_overloaded", True, 503),
    ({"error_rate": 1, "error_status": 429}, RateLimited, "upstream_rate_limited", True, 429),
    ({"error_rate": 1, "error_status": 500}, UpstreamError, "upstream_server_error", True, 502),
    ({"error_rate": 1, "error_status": 504}, GatewayTimeout, "upstream_timeout", True, 504),
    ({"error_rate": 1, "error_status": 400}, InvalidRequest, "upstream_bad_request", False, 400),
    # Our key refused: another provider may still serve (the route's breaker opens).
    ({"error_rate": 1, "error_status": 401}, UpstreamError, "upstream_auth", True, 502),
    ({"error_rate": 1, "error_status": 403}, UpstreamError, "upstream_auth", True, 502),
    ({"error_rate": 1, "error_status": 402}, UpstreamError, "upstream_auth", True, 502),
    # Too long for this model: a larger window may take it. Filtered: returned as it is.
    ({"context_window": 1, "prompt_tokens_override": 50}, InvalidRequest,
     "upstream_context_length_exceeded", True, 400),
    ({"content_filter": True}, InvalidRequest, "upstream_content_filtered", False, 400),
]


@pytest.mark.parametrize(("knobs", "cls", "code", "retryable", "status"), ERRORS)
@pytest.mark.parametrize("streaming", [False, True])
async def test_error_kinds(dialect: AnthropicMessages, route: Route, fake: FakeUpstream,
                           http: aiohttp.ClientSession, knobs: dict[str, Any],
                           cls: type[SwitchyardError], code: str, retryable: bool, status: int,
                           streaming: bool) -> None:
    fake.configure(**knobs)
    async with http.post(f"{fake.url}/messages", headers={"anthropic-version": "2023-06-01"},
                         json={"model": "m", "max_tokens": 5, "messages": [
                             {"role": "user", "content": "x"}]}) as resp:
        provider_message = (await resp.json())["error"]["message"]
    call = stream if streaming else complete
    with pytest.raises(SwitchyardError) as err:
        await call(dialect, route)
    assert type(err.value) is cls
    assert err.value.code == code
    assert err.value.retryable is retryable
    assert err.value.status == status
    assert err.value.message == f"anthropic: {provider_message}"


async def test_error_event_mid_stream(http: aiohttp.ClientSession) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        start = {"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 1, "output_tokens": 1}}}
        error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        for event in (start, error):
            await resp.write(f"event: {event['type']}\ndata: ".encode() + orjson.dumps(event)
                             + b"\n\n")
        return resp

    async with _server(handler) as base:
        with pytest.raises(Unavailable) as err:
            await stream(AnthropicMessages(http), Route("anthropic", "anthropic", base, KEY, "m"))
    assert err.value.code == "upstream_overloaded"
    assert err.value.retryable
    assert err.value.message == "anthropic: Overloaded"


async def test_stream_cut_mid_answer(dialect: AnthropicMessages, route: Route,
                                     fake: FakeUpstream) -> None:
    fake.configure(cut_after_tokens=2)
    seen: list[dict[str, Any]] = []
    with pytest.raises(SwitchyardError) as err:
        await _drain(dialect.stream(route, {"model": "c", "messages": MSGS}, "r-1"), seen)
    assert err.value.code == "upstream_stream_cut"
    assert err.value.retryable
    assert content_of([*seen, {}]) == "hello-0 hello-1 "


async def test_stream_ending_without_message_stop(http: aiohttp.ClientSession) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'event: ping\ndata: {"type": "ping"}\n\n')
        await resp.write_eof()  # a clean end, but the message never finished
        return resp

    async with _server(handler) as base:
        with pytest.raises(SwitchyardError) as err:
            await stream(AnthropicMessages(http), Route("anthropic", "anthropic", base, KEY, "m"))
    assert err.value.code == "upstream_stream_cut"


async def test_first_token_timeout(dialect: AnthropicMessages, fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=2000)
    slow = Route("anthropic", "anthropic", fake.url, KEY, "claude-test",
                 Timeouts(connect_s=2, ttft_s=0.3, idle_s=5, total_s=0.3))
    with pytest.raises(GatewayTimeout) as err:
        await stream(dialect, slow)
    assert err.value.code == "upstream_timeout"
    assert "first token" in err.value.message
    with pytest.raises(GatewayTimeout) as err:
        await complete(dialect, slow)
    assert err.value.code == "upstream_timeout"


async def test_unreachable(dialect: AnthropicMessages) -> None:
    nowhere = Route("anthropic", "anthropic", "http://127.0.0.1:9/v1", KEY, "m")
    with pytest.raises(UpstreamError) as err:
        await complete(dialect, nowhere)
    assert err.value.code == "upstream_unreachable"


# --- unsupported parameters ----------------------------------------------------------------


@pytest.mark.parametrize(("param", "extra"), [
    ("n", {"n": 2}),
    ("logprobs", {"logprobs": True}),
    ("top_logprobs", {"top_logprobs": 3}),
    ("presence_penalty", {"presence_penalty": 0.5}),
    ("frequency_penalty", {"frequency_penalty": -0.5}),
    ("logit_bias", {"logit_bias": {"50256": -100}}),
    ("seed", {"seed": 7}),
    ("audio", {"audio": {"voice": "alloy", "format": "mp3"}}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("prediction", {"prediction": {"type": "content", "content": "x"}}),
    ("web_search_options", {"web_search_options": {}}),
    ("verbosity", {"verbosity": "low"}),
    ("functions", {"functions": [{"name": "f", "parameters": {}}]}),
    ("temperature", {"temperature": 1.5}),
    ("reasoning_effort", {"reasoning_effort": "minimal"}),
    ("service_tier", {"service_tier": "flex"}),
    ("frobnicate", {"frobnicate": True}),
    ("tools[0].type", {"tools": [{"type": "custom", "custom": {"name": "c"}}]}),
    ("response_format", {"response_format": {"type": "grammar"}}),
    ("messages[0].content[1].type", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"},
        {"type": "input_audio", "input_audio": {"data": "AA==", "format": "wav"}}]}]}),
    ("messages[0].content[0].image_url.url", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}),
    ("messages[0].role", {"messages": [{"role": "function", "name": "f", "content": "x"}]}),
])
@pytest.mark.parametrize("streaming", [False, True])
async def test_unsupported_parameters(dialect: AnthropicMessages, route: Route,
                                      fake: FakeUpstream, param: str, extra: dict[str, Any],
                                      streaming: bool) -> None:
    call = stream if streaming else complete
    with pytest.raises(InvalidRequest) as err:
        await call(dialect, route, **extra)
    assert err.value.code == "unsupported_parameter"
    assert err.value.param == param
    assert err.value.status == 400
    assert "anthropic" in err.value.message
    assert fake.stats.requests_total == 0  # refused before anything was sent


async def test_harmless_parameters_are_accepted(dialect: AnthropicMessages, route: Route) -> None:
    result = await complete(dialect, route, n=1, logprobs=False, presence_penalty=0,
                            frequency_penalty=0.0, logit_bias={}, modalities=["text"],
                            metadata={"team": "a"}, store=False, stream_options=None,
                            prompt_cache_key="k", parallel_tool_calls=True, user="u-1",
                            temperature=0.2, top_p=0.9, stop=["\n\n"], reasoning_effort="low",
                            service_tier="auto")
    assert result["choices"][0]["message"]["content"].startswith("hello-0")


async def test_malformed_tool_arguments(dialect: AnthropicMessages, route: Route) -> None:
    history = [{"role": "user", "content": "hi"},
               {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "lookup", "arguments": "{not json"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "r"}]
    with pytest.raises(InvalidRequest) as err:
        await complete(dialect, route, messages=history, tools=TOOLS)
    assert err.value.code == "invalid_request"
    assert err.value.param == "messages[1].tool_calls[0].function.arguments"


async def test_json_tool_name_clash_is_refused(dialect: AnthropicMessages, route: Route) -> None:
    tools = [{"type": "function", "function": {"name": JSON_TOOL, "parameters": {}}}]
    with pytest.raises(InvalidRequest) as err:
        await complete(dialect, route, tools=tools, response_format={"type": "json_object"})
    assert err.value.param == "tools"


# --- the request on the wire ---------------------------------------------------------------


def test_request_translation() -> None:
    call = {"id": "toolu_1", "type": "function",
            "function": {"name": "lookup", "arguments": '{"query": "x"}'}}
    body = {"model": "alias", "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": [{"type": "text", "text": "be kind"}]},
        {"role": "user", "content": "one"},
        {"role": "user", "content": [
            {"type": "text", "text": "two"},
            {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "result"},
        {"role": "user", "content": "thanks"}],
        "tools": TOOLS, "tool_choice": "required", "parallel_tool_calls": False,
        "stop": "END", "temperature": 0.3, "top_p": 0.8, "user": "u-7",
        "max_completion_tokens": 99, "reasoning_effort": "high", "service_tier": "default"}
    payload = to_messages_request("anthropic", body, "claude-x").payload
    assert payload == {
        "model": "claude-x", "max_tokens": 99,
        "system": [{"type": "text", "text": "be brief"}, {"type": "text", "text": "be kind"}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "one"}, {"type": "text", "text": "two"},
                {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": PNG}}]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "toolu_1", "name": "lookup",
                 "input": {"query": "x"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "result"},
                {"type": "text", "text": "thanks"}]}],
        "stop_sequences": ["END"], "temperature": 0.3, "top_p": 0.8,
        "metadata": {"user_id": "u-7"}, "service_tier": "standard_only",
        "tools": [{"name": "lookup", "description": "Look a word up.",
                   "input_schema": TOOLS[0]["function"]["parameters"]}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "output_config": {"effort": "high"}}


@pytest.mark.parametrize(("choice", "want"), [
    ("auto", {"type": "auto"}),
    ("none", {"type": "none"}),
    ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "lookup"}}, {"type": "tool", "name": "lookup"}),
])
def test_tool_choice_translation(choice: object, want: dict[str, Any]) -> None:
    body = {"messages": MSGS, "tools": TOOLS, "tool_choice": choice}
    assert to_messages_request("anthropic", body, "m").payload["tool_choice"] == want


def test_parallel_tool_calls_off_without_a_choice() -> None:
    body = {"messages": MSGS, "tools": TOOLS, "parallel_tool_calls": False}
    assert to_messages_request("anthropic", body, "m").payload["tool_choice"] == {
        "type": "auto", "disable_parallel_tool_use": True}
    no_tools = to_messages_request("anthropic", {**body, "tools": None}, "m").payload
    assert "tool_choice" not in no_tools
    assert "tools" not in no_tools


def test_json_mode_translation() -> None:
    schema = {"type": "object", "properties": {}, "additionalProperties": False}
    native = to_messages_request("anthropic", {"messages": MSGS, "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": schema}}}, "m")
    assert native.json_tool is None
    assert native.payload["output_config"] == {"format": {"type": "json_schema",
                                                          "schema": schema}}
    forced = to_messages_request("anthropic", {
        "messages": MSGS, "response_format": {"type": "json_object"}}, "m")
    assert forced.json_tool == JSON_TOOL
    assert forced.payload["tools"][0]["input_schema"] == {"type": "object"}
    assert forced.payload["tool_choice"] == {"type": "tool", "name": JSON_TOOL,
                                             "disable_parallel_tool_use": True}
    assert forced.payload["max_tokens"] == DEFAULT_MAX_TOKENS == 4096
    with_tools = to_messages_request("anthropic", {
        "messages": MSGS, "tools": TOOLS, "response_format": {"type": "json_object"}}, "m")
    assert [t["name"] for t in with_tools.payload["tools"]] == ["lookup", JSON_TOOL]
    assert with_tools.payload["tool_choice"] == {"type": "any"}
    required = to_messages_request("anthropic", {
        "messages": MSGS, "tools": TOOLS, "tool_choice": "required",
        "response_format": {"type": "json_object"}}, "m")
    assert required.json_tool is None  # a tool call is required: no text to shape


# --- helpers -------------------------------------------------------------------------------


async def _drain(chunks: AsyncIterator[dict[str, Any]], into: list[dict[str, Any]]) -> None:
    async for chunk in chunks:
        into.append(chunk)


@contextlib.asynccontextmanager
async def _server(handler: Handler) -> AsyncIterator[str]:
    """A one-route Anthropic stand-in for wire shapes the fake never produces."""
    async with serving("/v1/messages", handler) as origin:
        yield f"{origin}/v1"


async def test_stream_ending_after_message_delta_without_message_stop_is_whole(
        dialect: AnthropicMessages, route: Route, fake: FakeUpstream) -> None:
    fake.configure(omit_done=True, malformed_after_tokens=1)  # a malformed event too
    chunks = await stream(dialect, route)
    assert content_of(chunks) == "hello-0 hello-1 hello-2 hello-3 hello-4 "
    assert finish_of(chunks) == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
