"""The Gemini dialect against the fake upstream (and, for what the fake never says, a stub):
every completion, chunk and embeddings response it emits must validate as OpenAI's."""

from __future__ import annotations

import base64
import contextlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from compose.fake_gemini import embedding_of
from compose.fake_state import FakeConfig
from compose.fake_upstream import FakeUpstream
from tests.wire_server import serving
from topics.errors import (
    GatewayTimeout,
    InvalidRequest,
    RateLimited,
    SwitchyardError,
    Unavailable,
    UpstreamError,
)
from workers.providers.base import Route, Timeouts
from workers.providers.gemini import GeminiGenerateContent, http_error, usage_of
from workers.providers.gemini_translate import (
    SKIP_SIGNATURE,
    json_schema,
    make_call_id,
    split_call_id,
    to_gemini,
)

PROVIDER = "gemini"
MODEL = "gemini-2.5-flash"
MSGS: list[dict[str, Any]] = [{"role": "system", "content": "be brief"},
                              {"role": "user", "content": "hello there world"}]
PROMPT_TOKENS = 13  # 2 + 3 words, plus 4 per turn: the same count as the OpenAI dialect's
TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {"name": "lookup", "description": "Look a word up.",
                                      "parameters": {"type": "object",
                                                     "properties": {"query": {"type": "string"}},
                                                     "required": ["query"]}}},
    {"type": "function", "function": {"name": "fetch", "parameters": {"type": "object"}}}]
PNG = "data:image/png;base64," + base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=5)) as upstream:
        yield upstream


@pytest_asyncio.fixture
async def dialect() -> AsyncIterator[GeminiGenerateContent]:
    async with aiohttp.ClientSession() as session:
        yield GeminiGenerateContent(session)


def _route(base: str, **timeouts: float) -> Route:
    return Route(PROVIDER, "gemini", f"{base}/v1beta", "gk-test", MODEL, Timeouts(**timeouts))


@pytest.fixture
def route(fake: FakeUpstream) -> Route:
    return _route(fake.base_url)


async def _complete(dialect: GeminiGenerateContent, route: Route, body: dict[str, Any],
                    rid: str = "req-1") -> dict[str, Any]:
    result = await dialect.complete(route, {"model": "ours", **body}, rid)
    ChatCompletion.model_validate(result)
    return result


async def _stream(dialect: GeminiGenerateContent, route: Route, body: dict[str, Any],
                  into: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    chunks = [] if into is None else into
    async for chunk in dialect.stream(route, {"model": "ours", "stream": True, **body}, "req-s"):
        ChatCompletionChunk.model_validate(chunk)
        chunks.append(chunk)
    return chunks


async def _run(dialect: GeminiGenerateContent, route: Route, body: dict[str, Any],
               streamed: bool) -> None:
    if streamed:
        await _stream(dialect, route, body)
    else:
        await _complete(dialect, route, body)


def _words(word: str, n: int) -> str:
    return "".join(f"{word}-{i} " for i in range(n))


def _text(chunks: list[dict[str, Any]]) -> str:
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])


async def test_complete_text(dialect: GeminiGenerateContent, route: Route,
                             fake: FakeUpstream) -> None:
    result = await _complete(dialect, route, {"messages": MSGS}, rid="rid-7")
    assert result["object"] == "chat.completion"
    assert result["id"].startswith("chatcmpl-")
    assert result["model"] == MODEL
    choice = result["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": _words("hello", 5),
                                 "refusal": None, "annotations": []}
    assert choice["finish_reason"] == "stop"
    assert result["usage"] == {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": 5,
                               "total_tokens": PROMPT_TOKENS + 5,
                               "prompt_tokens_details": {"cached_tokens": 0},
                               "completion_tokens_details": {"reasoning_tokens": 0}}
    assert fake.stats.last_authorization == "gk-test"
    assert fake.stats.calls_by_request_id == {"rid-7": 1}


async def test_stream_text(dialect: GeminiGenerateContent, route: Route,
                           fake: FakeUpstream) -> None:
    chunks = await _stream(dialect, route, {"messages": MSGS})
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:6]] == [
        f"hello-{i} " for i in range(5)]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * 6 + ["stop"]
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert fake.stats.completed_streams == 1


async def test_multipart_content(dialect: GeminiGenerateContent, route: Route) -> None:
    content = [{"type": "text", "text": "multi"},
               {"type": "image_url", "image_url": {"url": PNG, "detail": "auto"}},
               {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
               {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
               {"type": "text", "text": "part more"}]
    body = {"messages": [{"role": "user", "content": content}]}
    result = await _complete(dialect, route, body)
    assert result["choices"][0]["message"]["content"] == _words("multipart", 5)
    parts = to_gemini(PROVIDER, body)["contents"][0]["parts"]
    assert parts[1:4] == [
        {"inlineData": {"mimeType": "image/png", "data": PNG.split(",", 1)[1]}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.jpg"}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}}]


async def test_tool_call_out(dialect: GeminiGenerateContent, route: Route) -> None:
    body = {"messages": [{"role": "user", "content": "find cats"}], "tools": TOOLS}
    result = await _complete(dialect, route, body)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == ""  # a string, never null (the Rust SDK)
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function"
    assert call["function"]["name"] == "lookup"
    assert json.loads(call["function"]["arguments"]) == {"query": "find"}
    # The id carries the call's thought signature, so the replayed history can return it.
    gemini_id, signature = split_call_id(call["id"])
    assert gemini_id.startswith("call_")
    assert len(gemini_id) == 29
    assert base64.b64decode(signature or "") == b"fake-thought-signature:lookup"

    chunks = await _stream(dialect, route, body)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    [delta] = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert delta["index"] == 0
    assert delta["id"].startswith("call_")
    assert delta["function"] == call["function"]
    assert chunks[2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"]["completion_tokens"] == 3


async def test_tool_result_in(dialect: GeminiGenerateContent, route: Route) -> None:
    first = await _complete(dialect, route, {
        "messages": [{"role": "user", "content": "find cats"}], "tools": TOOLS})
    message = first["choices"][0]["message"]
    call_id = message["tool_calls"][0]["id"]
    history = [{"role": "user", "content": "find cats"}, message,
               {"role": "tool", "tool_call_id": call_id, "content": '{"count": 3}'}]
    # The fake, like Gemini 3, refuses a replayed call without its signature: this passing
    # proves the signature round-tripped through the id.
    result = await _complete(dialect, route, {"messages": history, "tools": TOOLS})
    assert result["choices"][0]["message"]["content"] == _words("find", 5)
    assert result["choices"][0]["finish_reason"] == "stop"
    sent = to_gemini(PROVIDER, {"messages": history, "tools": TOOLS})["contents"]
    assert sent[1]["parts"][0]["functionCall"]["id"] == split_call_id(call_id)[0]
    assert sent[2] == {"role": "user", "parts": [{"functionResponse": {
        "id": split_call_id(call_id)[0], "name": "lookup", "response": {"count": 3}}}]}

    # Calls minted elsewhere (no signature) still replay, under Google's documented placeholder.
    foreign = [{"role": "user", "content": "find cats"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "toolu_1", "type": "function",
                    "function": {"name": "lookup", "arguments": '{"query": "a"}'}},
                   {"id": "toolu_2", "type": "function",
                    "function": {"name": "fetch", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "toolu_1", "content": "plain text"},
               {"role": "tool", "tool_call_id": "toolu_2", "content": "[1, 2]"}]
    result = await _complete(dialect, route, {"messages": foreign, "tools": TOOLS})
    assert result["choices"][0]["message"]["content"] == _words("find", 5)
    sent = to_gemini(PROVIDER, {"messages": foreign})["contents"]
    assert [p.get("thoughtSignature") for p in sent[1]["parts"]] == [SKIP_SIGNATURE, None]
    # Parallel results travel in one turn; a non-object result is read under "output".
    assert [p["functionResponse"] for p in sent[2]["parts"]] == [
        {"id": "toolu_1", "name": "lookup", "response": {"output": "plain text"}},
        {"id": "toolu_2", "name": "fetch", "response": {"output": [1, 2]}}]
    assert len(sent) == 3

    with pytest.raises(InvalidRequest) as info:
        await dialect.complete(route, {"messages": [
            {"role": "user", "content": "x"},
            {"role": "tool", "tool_call_id": "nope", "content": "1"}]}, "r")
    assert info.value.code == "unknown_tool_call_id"


async def test_tool_choice(dialect: GeminiGenerateContent, route: Route) -> None:
    base = {"messages": [{"role": "user", "content": "find cats"}], "tools": TOOLS}
    none = await _complete(dialect, route, {**base, "tool_choice": "none"})
    assert none["choices"][0]["message"]["content"] == _words("find", 5)
    named = await _complete(dialect, route, {
        **base, "tool_choice": {"type": "function", "function": {"name": "fetch"}}})
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "fetch"
    required = await _complete(dialect, route, {**base, "tool_choice": "required"})
    assert required["choices"][0]["finish_reason"] == "tool_calls"

    def mode(body: dict[str, Any]) -> dict[str, Any]:
        return dict(to_gemini(PROVIDER, {**base, **body})["toolConfig"]["functionCallingConfig"])

    assert mode({"tool_choice": "auto"}) == {"mode": "AUTO"}
    assert mode({"tool_choice": "required"}) == {"mode": "ANY"}
    assert mode({"tool_choice": {"type": "allowed_tools", "allowed_tools": {
        "mode": "auto", "tools": [{"type": "function", "function": {"name": "fetch"}}]}}}) == {
        "mode": "VALIDATED", "allowedFunctionNames": ["fetch"]}
    strict = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    assert mode({"tools": strict}) == {"mode": "VALIDATED"}  # Gemini's schema-adherent AUTO
    declaration = to_gemini(PROVIDER, base)["tools"][0]["functionDeclarations"][0]
    assert declaration == {"name": "lookup", "description": "Look a word up.",
                           "parametersJsonSchema": TOOLS[0]["function"]["parameters"]}


async def test_json_mode(dialect: GeminiGenerateContent, route: Route) -> None:
    expected = {"word": "hello", "tokens": 5}
    result = await _complete(dialect, route, {"messages": MSGS,
                                              "response_format": {"type": "json_object"}})
    assert json.loads(result["choices"][0]["message"]["content"]) == expected
    schema = {"type": "object", "properties": {"word": {"type": "string"}},
              "required": ["word"], "additionalProperties": False}
    body = {"messages": MSGS, "response_format": {"type": "json_schema", "json_schema": {
        "name": "w", "description": "One word.", "schema": schema, "strict": True}}}
    chunks = await _stream(dialect, route, body)
    assert json.loads(_text(chunks)) == expected
    assert to_gemini(PROVIDER, body)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {**schema, "description": "One word."}}


@pytest.mark.parametrize(("knobs", "cls", "code", "retryable", "words"), [
    ({"outage": True}, Unavailable, "upstream_overloaded", True, "overloaded"),
    ({"error_rate": 1, "error_status": 429}, RateLimited, "upstream_rate_limited", True, "error"),
    ({"error_rate": 1, "error_status": 500}, UpstreamError, "upstream_server_error", True,
     "error"),
    ({"error_rate": 1, "error_status": 504}, GatewayTimeout, "upstream_timeout", True, "error"),
    ({"error_rate": 1, "error_status": 400}, InvalidRequest, "upstream_bad_request", False,
     "error"),
    ({"error_rate": 1, "error_status": 403}, UpstreamError, "upstream_auth", True, "error"),
    ({"context_window": 1}, InvalidRequest, "upstream_context_length_exceeded", True, "token"),
])
async def test_upstream_errors(dialect: GeminiGenerateContent, route: Route, fake: FakeUpstream,
                               knobs: dict[str, Any], cls: type[SwitchyardError], code: str,
                               retryable: bool, words: str) -> None:
    fake.configure(**knobs)
    for streamed in (False, True):
        with pytest.raises(SwitchyardError) as info:
            await _run(dialect, route, {"messages": MSGS}, streamed)
        err = info.value
        assert type(err) is cls
        assert (err.code, err.retryable) == (code, retryable)
        assert err.message.startswith(f"{PROVIDER}: ")
        assert words in err.message


@pytest.mark.parametrize(("status", "error", "code"), [
    (400, {"code": 400, "status": "FAILED_PRECONDITION",
           "message": "User location is not supported for the API use."}, "upstream_auth"),
    (400, {"code": 400, "status": "INVALID_ARGUMENT", "message": "API key not valid.",
           "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                        "reason": "API_KEY_INVALID"}]}, "upstream_auth"),
    (401, {"code": 401, "status": "UNAUTHENTICATED", "message": "no"}, "upstream_auth"),
    (404, {"code": 404, "status": "NOT_FOUND", "message": "models/x is not found"},
     "upstream_bad_request"),
    (500, {"code": 500, "status": "INTERNAL", "message": "boom"}, "upstream_server_error"),
    (503, {"code": 503, "status": "UNAVAILABLE", "message": "busy"}, "upstream_overloaded"),
])
def test_google_status_mapping(status: int, error: dict[str, Any], code: str) -> None:
    err = http_error(PROVIDER, status, orjson.dumps({"error": error}))
    assert err.code == code
    assert err.message == f"{PROVIDER}: {error['message']}"
    as_array = http_error(PROVIDER, status, orjson.dumps([{"error": error}]))
    assert as_array.code == code  # the non-SSE stream wraps its error in an array
    assert http_error(PROVIDER, 502, b"<html>bad gateway</html>").code == "upstream_server_error"


async def test_usage_with_cached_tokens(dialect: GeminiGenerateContent, route: Route,
                                        fake: FakeUpstream) -> None:
    fake.configure(cached_tokens=7, prompt_tokens_override=100)
    expected = {"prompt_tokens": 100, "completion_tokens": 5, "total_tokens": 105,
                "prompt_tokens_details": {"cached_tokens": 7},
                "completion_tokens_details": {"reasoning_tokens": 0}}
    assert (await _complete(dialect, route, {"messages": MSGS}))["usage"] == expected
    assert (await _stream(dialect, route, {"messages": MSGS}))[-1]["usage"] == expected
    assert usage_of({"promptTokenCount": 10, "candidatesTokenCount": 4, "thoughtsTokenCount": 6,
                     "toolUsePromptTokenCount": 2, "cachedContentTokenCount": 3}) == {
        "prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 3},
        "completion_tokens_details": {"reasoning_tokens": 6}}


async def test_stream_cut(dialect: GeminiGenerateContent, route: Route,
                          fake: FakeUpstream) -> None:
    fake.configure(cut_after_tokens=2)
    received: list[dict[str, Any]] = []
    with pytest.raises(UpstreamError) as info:
        await _stream(dialect, route, {"messages": MSGS}, into=received)
    assert info.value.code == "upstream_stream_cut"
    assert info.value.retryable
    assert _text(received) == _words("hello", 2)


@pytest.mark.parametrize(("knobs", "timeouts", "phase", "streamed"), [
    ({"ttft_ms": 1000}, {"ttft_s": 0.1}, "first token", True),
    ({"inter_token_ms": 1000}, {"idle_s": 0.1}, "next chunk", True),
    ({"ttft_ms": 1000}, {"total_s": 0.1}, "answer", False),
])
async def test_timeouts(dialect: GeminiGenerateContent, fake: FakeUpstream,
                        knobs: dict[str, Any], timeouts: dict[str, float], phase: str,
                        streamed: bool) -> None:
    fake.configure(**knobs)
    route = _route(fake.base_url, **timeouts)
    with pytest.raises(GatewayTimeout) as info:
        await _run(dialect, route, {"messages": MSGS}, streamed)
    assert info.value.code == "upstream_timeout"
    assert phase in info.value.message


@pytest.mark.parametrize(("body", "param"), [
    ({"logit_bias": {"1": 2}}, "logit_bias"),
    ({"parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"store": True}, "store"),
    ({"service_tier": "flex"}, "service_tier"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"audio": {"voice": "x"}}, "audio"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"reasoning_effort": "turbo"}, "reasoning_effort"),
    ({"something_new": 1}, "something_new"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"tools": [{"type": "custom", "custom": {"name": "c"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "1bad"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"s": {"type": "string", "pattern": "^a"}}}}}]},
     "tools[0].function.parameters.properties.s.pattern"),
    ({"tool_choice": {"type": "custom", "custom": {"name": "c"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "hi", "name": "ann"}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": PNG, "detail": "high"}}]}]}, "messages[0].content[0].image_url.detail"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "http://example.com/a.png"}}]}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "https://example.com/image"}}]}]}, "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "file", "file": {
        "file_id": "file-1"}}]}]}, "messages[0].content[0].file.file_id"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {
        "data": "x", "format": "flac"}}]}]}, "messages[0].content[0].input_audio.format"),
])
async def test_unsupported_parameters(dialect: GeminiGenerateContent, route: Route,
                                      fake: FakeUpstream, body: dict[str, Any],
                                      param: str) -> None:
    for streamed in (False, True):
        with pytest.raises(InvalidRequest) as info:
            await _run(dialect, route, {"messages": MSGS, **body}, streamed)
        err = info.value
        assert (err.status, err.code, err.param) == (400, "unsupported_parameter", param)
        assert err.message.startswith(f"{param} is not supported by {PROVIDER}")
    assert fake.stats.requests_total == 0  # refused before anything was sent


async def test_accepted_labels_and_generation_config(dialect: GeminiGenerateContent,
                                                     route: Route) -> None:
    labels = {"user": "u1", "safety_identifier": "s", "prompt_cache_key": "k", "store": False,
              "parallel_tool_calls": True, "service_tier": "auto", "modalities": ["text"],
              "stream_options": {"include_usage": True}, "metadata": None}
    result = await _complete(dialect, route, {"messages": MSGS, **labels})
    assert result["choices"][0]["message"]["content"] == _words("hello", 5)
    body = {"messages": [{"role": "developer", "content": "d"}, *MSGS,
                         {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
                         {"role": "user", "content": "more"}],
            "temperature": 0.5, "top_p": 0.9, "max_tokens": 10, "max_completion_tokens": 20,
            "n": 2, "stop": "END", "seed": 7, "presence_penalty": 0.1,
            "frequency_penalty": 0.2, "logprobs": True, "top_logprobs": 3,
            "reasoning_effort": "low"}
    payload = to_gemini(PROVIDER, body)
    assert payload["systemInstruction"] == {"parts": [{"text": "d"}, {"text": "be brief"}]}
    assert [c["role"] for c in payload["contents"]] == ["user", "model", "user"]
    assert payload["generationConfig"] == {
        "temperature": 0.5, "topP": 0.9, "seed": 7, "candidateCount": 2,
        "presencePenalty": 0.1, "frequencyPenalty": 0.2, "maxOutputTokens": 20,
        "stopSequences": ["END"], "responseLogprobs": True, "logprobs": 3,
        "thinkingConfig": {"thinkingLevel": "LOW"}}
    assert to_gemini(PROVIDER, {"messages": MSGS, "reasoning_effort": "none"})[
        "generationConfig"] == {"thinkingConfig": {"thinkingBudget": 0}}


async def test_logprobs_and_length(dialect: GeminiGenerateContent, route: Route) -> None:
    body = {"messages": MSGS, "logprobs": True, "top_logprobs": 2, "max_tokens": 2}
    result = await _complete(dialect, route, body)
    choice = result["choices"][0]
    assert choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert [(c["token"], c["logprob"]) for c in content] == [("hello-0 ", -0.25),
                                                             ("hello-1 ", -0.5)]
    assert content[0]["bytes"] == list(b"hello-0 ")
    assert [len(c["top_logprobs"]) for c in content] == [2, 2]
    chunks = await _stream(dialect, route, body)
    streamed = [c["choices"][0]["logprobs"] for c in chunks if c["choices"]
                and c["choices"][0]["delta"].get("content")]
    assert [lp["content"][0]["token"] for lp in streamed] == ["hello-0 ", "hello-1 "]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_json_schema_conversion() -> None:
    schema = {"$schema": "https://json-schema.org/draft-07/schema", "type": "object",
              "definitions": {"Pet": {"type": "string", "const": "cat", "default": "cat"}},
              "properties": {"pet": {"$ref": "#/definitions/Pet", "description": "A pet."},
                             "pair": {"type": "array", "items": [{"type": "integer"},
                                                                 {"type": "number"}]}},
              "examples": [{}]}
    assert json_schema(PROVIDER, schema, "p") == {
        "type": "object", "$defs": {"Pet": {"type": "string", "enum": ["cat"]}},
        "properties": {"pet": {"description": "A pet.", "anyOf": [{"$ref": "#/$defs/Pet"}]},
                       "pair": {"type": "array", "prefixItems": [{"type": "integer"},
                                                                 {"type": "number"}]}}}
    for bad, where in (({"allOf": [{}]}, "p.allOf"), ({"enum": [True]}, "p.enum"),
                       ({"items": {"uniqueItems": True}}, "p.items.uniqueItems")):
        with pytest.raises(InvalidRequest) as info:
            json_schema(PROVIDER, bad, "p")
        assert info.value.param == where


def test_call_ids_are_stable() -> None:
    signature = base64.b64encode(bytes(range(250))).decode()  # has + and / in it
    first = make_call_id("resp:0:0:lookup", signature)
    assert first == make_call_id("resp:0:0:lookup", signature)
    assert first != make_call_id("resp2:0:0:lookup", signature)
    assert set(first) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
    assert split_call_id(first) == (make_call_id("resp:0:0:lookup", None), signature)
    assert split_call_id("call_abc") == ("call_abc", None)


@contextlib.asynccontextmanager
async def _stub(status: int, body: bytes, sse: bool = False) -> AsyncIterator[Route]:
    """A one-answer server, for what the fake never says."""
    async def answer(request: web.Request) -> web.Response:
        return web.Response(status=status, body=body,
                            content_type="text/event-stream" if sse else "application/json")
    async with serving("/v1beta/models/{tail}", answer) as origin:
        yield _route(origin)


def _sse(*events: dict[str, Any]) -> bytes:
    return b"".join(b"data: " + orjson.dumps(e) + b"\r\n\r\n" for e in events)


def _cand(parts: list[dict[str, Any]], finish: str | None = "STOP",
          index: int = 0) -> dict[str, Any]:
    return {"content": {"role": "model", "parts": parts}, "index": index,
            **({"finishReason": finish} if finish else {})}


async def test_thoughts_and_several_candidates(dialect: GeminiGenerateContent) -> None:
    usage = {"promptTokenCount": 4, "candidatesTokenCount": 6, "thoughtsTokenCount": 9}
    answer = {"candidates": [
        _cand([{"text": "pondering", "thought": True}, {"text": "one"}]),
        _cand([{"text": "two"}, {"functionCall": {"name": "f", "args": {"a": 1}}}], index=1)],
        "usageMetadata": usage, "responseId": "r1"}
    async with _stub(200, orjson.dumps(answer)) as route:
        result = await _complete(dialect, route, {"messages": MSGS, "n": 2})
    one, two = result["choices"]
    assert (one["message"]["content"], one["finish_reason"]) == ("one", "stop")
    assert (two["message"]["content"], two["finish_reason"]) == ("two", "tool_calls")
    assert result["usage"]["completion_tokens"] == 15
    assert result["usage"]["completion_tokens_details"] == {"reasoning_tokens": 9}

    events = _sse({"candidates": [_cand([{"text": "hm", "thought": True}], None)],
                   "responseId": "r1"},
                  {"candidates": [_cand([{"text": "one"}], None),
                                  _cand([{"functionCall": {"name": "f", "args": {"a": 1}}}],
                                        "STOP", index=1)], "responseId": "r1"},
                  {"candidates": [_cand([{"text": "!"}])], "usageMetadata": usage,
                   "responseId": "r1"})
    async with _stub(200, events, sse=True) as route:
        chunks = await _stream(dialect, route, {"messages": MSGS, "n": 2})
    by_choice: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks[:-1]:
        by_choice.setdefault(chunk["choices"][0]["index"], []).append(chunk["choices"][0])
    assert "".join(c["delta"].get("content") or "" for c in by_choice[0]) == "one!"
    assert by_choice[1][-1]["finish_reason"] == "tool_calls"
    # The same Gemini call gets the same id whether it came streamed or not.
    streamed_call = by_choice[1][1]["delta"]["tool_calls"][0]
    assert streamed_call["id"] == two["message"]["tool_calls"][0]["id"]
    assert chunks[-1]["usage"]["completion_tokens"] == 15


@pytest.mark.parametrize("sse", [False, True])
async def test_answers_the_fake_never_gives(dialect: GeminiGenerateContent, sse: bool) -> None:
    def body(*events: dict[str, Any]) -> bytes:
        return _sse(*events) if sse else orjson.dumps(events[-1])

    async def attempt(payload: bytes) -> SwitchyardError:
        async with _stub(200, payload, sse=sse) as route:
            with pytest.raises(SwitchyardError) as info:
                await _run(dialect, route, {"messages": MSGS}, sse)
        return info.value

    blocked = await attempt(body({"promptFeedback": {"blockReason": "SAFETY"}}))
    assert (blocked.code, blocked.status) == ("upstream_content_filtered", 400)
    assert "SAFETY" in blocked.message
    malformed = await attempt(body({"candidates": [_cand([], "MALFORMED_FUNCTION_CALL")]}))
    assert malformed.code == "upstream_server_error"
    assert malformed.retryable
    in_stream = await attempt(body({"error": {"code": 503, "status": "UNAVAILABLE",
                                              "message": "overloaded"}}))
    assert in_stream.code == "upstream_overloaded"
    filtered = {"candidates": [_cand([{"text": "partial"}], "SAFETY")]}
    async with _stub(200, body(filtered), sse=sse) as route:
        if sse:
            chunks = await _stream(dialect, route, {"messages": MSGS})
            assert chunks[-2]["choices"][0]["finish_reason"] == "content_filter"
            assert chunks[-1]["usage"] is None  # none reported: the router estimates
        else:
            result = await _complete(dialect, route, {"messages": MSGS})
            assert result["choices"][0]["finish_reason"] == "content_filter"
    if sse:  # a body that ends cleanly but never said it was finished
        cut = await attempt(_sse({"candidates": [_cand([{"text": "a"}], None)]}))
        assert cut.code == "upstream_stream_cut"


async def test_embeddings(dialect: GeminiGenerateContent, fake: FakeUpstream) -> None:
    route = Route(PROVIDER, "gemini", f"{fake.base_url}/v1beta", "gk", "gemini-embedding-001")
    result = await dialect.embed(route, {"model": "e", "input": ["alpha", "beta gamma"]}, "r")
    assert result.pop("usage_estimated") is True  # Gemini reports none: estimated, and marked
    CreateEmbeddingResponse.model_validate(result)
    assert [d["embedding"] for d in result["data"]] == [embedding_of("alpha"),
                                                       embedding_of("beta gamma")]
    assert [d["index"] for d in result["data"]] == [0, 1]
    assert result["usage"] == {"prompt_tokens": 5, "total_tokens": 5}  # ⌈chars / 4⌉ each

    short = await dialect.embed(route, {"input": "alpha", "dimensions": 4,
                                        "encoding_format": "base64", "user": "u"}, "r")
    raw = base64.b64decode(short["data"][0]["embedding"])
    assert struct.unpack("<4f", raw) == pytest.approx(embedding_of("alpha", 4), abs=1e-6)

    many = await dialect.embed(route, {"input": [f"t{i}" for i in range(150)]}, "r2")
    assert len(many["data"]) == 150
    assert many["data"][149]["embedding"] == embedding_of("t149")
    assert fake.stats.calls_by_request_id["r2"] == 2  # at most 100 per batchEmbedContents

    for body, param in (({"input": [[1, 2]]}, "input"), ({"input": "x", "foo": 1}, "foo"),
                        ({"input": "x", "encoding_format": "int8"}, "encoding_format")):
        with pytest.raises(InvalidRequest) as info:
            await dialect.embed(route, body, "r")
        assert (info.value.code, info.value.param) == ("unsupported_parameter", param)
    fake.configure(outage=True)
    with pytest.raises(Unavailable):
        await dialect.embed(route, {"input": "x"}, "r")


async def test_embeddings_usage_when_reported(dialect: GeminiGenerateContent) -> None:
    answer = {"embeddings": [{"values": [0.5, -0.5]}], "usageMetadata": {"promptTokenCount": 3}}
    async with _stub(200, orjson.dumps(answer)) as route:
        result = await dialect.embed(route, {"input": "abc"}, "r")
    assert result["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert result.pop("usage_estimated") is False
    CreateEmbeddingResponse.model_validate(result)


async def test_a_malformed_chunk_mid_stream_is_skipped(dialect: GeminiGenerateContent,
                                                       route: Route,
                                                       fake: FakeUpstream) -> None:
    fake.configure(malformed_after_tokens=2)
    assert _text(await _stream(dialect, route, {"messages": MSGS})) == _words("hello", 5)


async def test_a_retry_delay_in_the_error_body_is_the_retry_after(
        dialect: GeminiGenerateContent, route: Route, fake: FakeUpstream) -> None:
    fake.configure(error_rate=1.0, error_status=429)
    with pytest.raises(SwitchyardError) as info:
        await _complete(dialect, route, {"messages": MSGS})
    assert (info.value.status, info.value.retry_after_s, info.value.transient) == (429, 1.0, True)
