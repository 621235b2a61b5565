"""The OpenAI-compatible dialect against the fake upstream: what it returns, and how each
provider failure lands in our taxonomy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from openai.types import CreateEmbeddingResponse
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from prometheus_client import CollectorRegistry

from compose.fake_state import FakeConfig
from compose.fake_upstream import FakeUpstream, expected_content
from tests.wire_server import serving
from topics.errors import SwitchyardError
from workers.providers.base import MAX_MALFORMED_IN_A_ROW, Route, Timeouts
from workers.providers.openai_compat import OpenAICompat
from workers.router.metrics import RouterMetrics

MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "adapter test"}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "find a thing",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=6)) as upstream:
        yield upstream


@pytest_asyncio.fixture
async def adapter() -> AsyncIterator[OpenAICompat]:
    async with aiohttp.ClientSession() as session:
        yield OpenAICompat(session)


def route(fake: FakeUpstream, **timeouts: float) -> Route:
    return Route("openai", "openai", fake.url, "sk-test", "gpt-4o-mini", Timeouts(**timeouts))


async def collect(adapter: OpenAICompat, fake: FakeUpstream, body: dict[str, Any],
                  **timeouts: float) -> list[dict[str, Any]]:
    return [c async for c in adapter.stream(route(fake, **timeouts), body, "req-1")]


async def test_complete_returns_the_provider_answer(adapter: OpenAICompat,
                                                    fake: FakeUpstream) -> None:
    result = await adapter.complete(route(fake), {"model": "x", "messages": MESSAGES}, "r1")
    completion = ChatCompletion.model_validate(result)
    assert completion.choices[0].message.content == expected_content(MESSAGES, 6)
    assert fake.stats.last_authorization == "Bearer sk-test"
    assert fake.stats.calls_by_request_id == {"r1": 1}


async def test_stream_requests_usage_even_if_the_client_did_not(adapter: OpenAICompat,
                                                                fake: FakeUpstream) -> None:
    chunks = await collect(adapter, fake, {"model": "x", "messages": MESSAGES})
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == expected_content(MESSAGES, 6)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_tools_pass_through_and_arguments_stream_as_valid_json(
        adapter: OpenAICompat, fake: FakeUpstream) -> None:
    body = {"model": "x", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto"}
    chunks = await collect(adapter, fake, body)
    calls = [tc for c in chunks if c["choices"] for tc in c["choices"][0]["delta"]
             .get("tool_calls") or ()]
    assert calls[0]["function"]["name"] == "lookup"
    arguments = "".join(tc["function"].get("arguments") or "" for tc in calls)
    assert orjson.loads(arguments) == {"query": "adapter"}
    assert [c for c in chunks if c["choices"]][-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_whole_tool_call_answer_has_string_content(adapter: OpenAICompat,
                                                             fake: FakeUpstream) -> None:
    # The upstream writes `content: null` beside the tool call, as OpenAI does; the seed
    # product's Rust SDK cannot decode a null there, so the dialect hands on "".
    body = {"model": "x", "messages": MESSAGES, "tools": TOOLS, "tool_choice": "auto"}
    result = await adapter.complete(route(fake), body, "r")
    message = result["choices"][0]["message"]
    assert message["content"] == ""
    assert message["tool_calls"][0]["function"]["name"] == "lookup"
    assert ChatCompletion.model_validate(result).choices[0].message.tool_calls


async def test_json_mode_answers_a_json_document(adapter: OpenAICompat,
                                                 fake: FakeUpstream) -> None:
    body = {"model": "x", "messages": MESSAGES, "response_format": {"type": "json_object"}}
    result = await adapter.complete(route(fake), body, "r")
    assert orjson.loads(result["choices"][0]["message"]["content"])["word"] == "adapter"


@pytest.mark.parametrize(("knobs", "status", "code", "retryable"), [
    ({"error_rate": 1.0, "error_status": 429}, 429, "upstream_rate_limited", True),
    ({"outage": True}, 503, "upstream_overloaded", True),
    ({"error_rate": 1.0, "error_status": 500}, 502, "upstream_server_error", True),
    # Our key refused: another provider may still serve (the route's breaker opens).
    ({"error_rate": 1.0, "error_status": 401}, 502, "upstream_auth", True),
    ({"error_rate": 1.0, "error_status": 400}, 400, "upstream_bad_request", False),
    ({"context_window": 1}, 400, "upstream_context_length_exceeded", True),
    ({"content_filter": True}, 400, "upstream_content_filtered", False),
    ({"error_rate": 1.0, "error_status": 504}, 504, "upstream_timeout", True),
])
async def test_each_failure_lands_in_the_taxonomy_with_the_providers_message(
        adapter: OpenAICompat, fake: FakeUpstream, knobs: dict[str, Any], status: int,
        code: str, retryable: bool) -> None:
    fake.configure(**knobs)
    body = {"model": "x", "messages": MESSAGES}
    for call in (adapter.complete(route(fake), body, "r"), collect(adapter, fake, body)):
        with pytest.raises(SwitchyardError) as failure:
            await call
        assert (failure.value.status, failure.value.code) == (status, code)
        assert failure.value.retryable is retryable
        assert failure.value.message.startswith("openai: ")
        assert len(failure.value.message) > len("openai: ") + 10  # the provider's own words


async def test_a_stream_cut_mid_answer_is_an_error(adapter: OpenAICompat,
                                                   fake: FakeUpstream) -> None:
    fake.configure(cut_after_tokens=3)
    with pytest.raises(SwitchyardError) as failure:
        await collect(adapter, fake, {"model": "x", "messages": MESSAGES})
    assert failure.value.code == "upstream_stream_cut"


async def test_first_token_timeout(adapter: OpenAICompat, fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=1000)
    with pytest.raises(SwitchyardError) as failure:
        await collect(adapter, fake, {"model": "x", "messages": MESSAGES}, ttft_s=0.2)
    assert (failure.value.code, failure.value.status) == ("upstream_timeout", 504)
    assert "first token" in failure.value.message


async def test_idle_gap_timeout_between_chunks(adapter: OpenAICompat,
                                               fake: FakeUpstream) -> None:
    fake.configure(inter_token_ms=800)
    with pytest.raises(SwitchyardError) as failure:
        await collect(adapter, fake, {"model": "x", "messages": MESSAGES}, idle_s=0.2)
    assert failure.value.code == "upstream_timeout"
    assert "next chunk" in failure.value.message


async def test_time_the_caller_spends_on_a_chunk_is_not_provider_silence(
        adapter: OpenAICompat, fake: FakeUpstream) -> None:
    fake.configure(inter_token_ms=20)
    chunks = []
    async for chunk in adapter.stream(route(fake, idle_s=0.15), {"model": "x",
                                                                  "messages": MESSAGES}, "r"):
        chunks.append(chunk)
        await asyncio.sleep(0.3)  # longer than idle_s, while the provider keeps sending
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"])
    assert text == expected_content(MESSAGES, 6)


async def test_a_stream_that_stalls_after_a_slow_caller_still_times_out(
        adapter: OpenAICompat, fake: FakeUpstream) -> None:
    fake.configure(inter_token_ms=1500)
    seen = 0

    async def read_slowly() -> None:
        nonlocal seen
        async for _ in adapter.stream(route(fake, idle_s=0.2), {"model": "x",
                                                                "messages": MESSAGES}, "r"):
            seen += 1
            await asyncio.sleep(0.3)

    with pytest.raises(SwitchyardError) as failure:
        await read_slowly()
    # The role chunk and the first token arrive together; nothing after them.
    assert (seen, failure.value.code) == (2, "upstream_timeout")
    assert "next chunk" in failure.value.message


async def test_keep_alive_comments_alone_do_not_hold_off_the_idle_timeout(
        adapter: OpenAICompat) -> None:
    first = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"},
                          "finish_reason": None}]}

    async def stalls_behind_keep_alives(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + orjson.dumps(first) + b"\n\n")
        for _ in range(40):  # 2 s of comments, never another event
            await asyncio.sleep(0.05)
            await resp.write(b": keep-alive\n\n")
        return resp

    seen = []

    async def read(url: str) -> None:
        async for chunk in adapter.stream(Route("openai", "openai", url, None, "m",
                                                Timeouts(idle_s=0.3)),
                                          {"model": "x", "messages": MESSAGES}, "r"):
            seen.append(chunk)

    async with serving("/v1/chat/completions", stalls_behind_keep_alives) as origin:
        with pytest.raises(SwitchyardError) as failure:
            await asyncio.wait_for(read(f"{origin}/v1"), timeout=1.5)
    assert (len(seen), failure.value.code) == (1, "upstream_timeout")


async def test_total_timeout(adapter: OpenAICompat, fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=1000)
    with pytest.raises(SwitchyardError) as failure:
        await adapter.complete(route(fake, total_s=0.2), {"model": "x", "messages": MESSAGES},
                               "r")
    assert failure.value.code == "upstream_timeout"


async def test_connect_failure_is_unreachable(adapter: OpenAICompat) -> None:
    dead = Route("openai", "openai", "http://127.0.0.1:9/v1", None, "m", Timeouts())
    with pytest.raises(SwitchyardError) as failure:
        await adapter.complete(dead, {"model": "x", "messages": MESSAGES}, "r")
    assert (failure.value.code, failure.value.retryable) == ("upstream_unreachable", True)


async def test_embeddings(adapter: OpenAICompat, fake: FakeUpstream) -> None:
    result = await adapter.embed(route(fake), {"model": "x", "input": ["one two", "three"]},
                                 "r")
    parsed = CreateEmbeddingResponse.model_validate(result)
    assert len(parsed.data) == 2
    assert parsed.usage.prompt_tokens == 3


# --- transient faults and stream ends (tests/test_provider_faults.py drives them end to end)

async def test_a_stream_ending_after_its_finish_reason_without_done_is_whole(
        adapter: OpenAICompat, fake: FakeUpstream) -> None:
    fake.configure(omit_done=True)
    chunks = await collect(adapter, fake, {"model": "x", "messages": MESSAGES})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == expected_content(MESSAGES, 6)
    assert chunks[-1]["usage"]["completion_tokens"] == 6


async def test_malformed_events_are_skipped_and_counted_unless_they_keep_coming(
        fake: FakeUpstream) -> None:
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)
    async with aiohttp.ClientSession() as session:
        adapter = OpenAICompat(session, metrics.malformed_event)
        fake.configure(malformed_after_tokens=2, malformed_events=MAX_MALFORMED_IN_A_ROW)
        chunks = await collect(adapter, fake, {"model": "x", "messages": MESSAGES})
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"]) == expected_content(MESSAGES, 6)
        assert registry.get_sample_value("switchyard_router_malformed_stream_events_total",
                                         {"provider": "openai"}) == MAX_MALFORMED_IN_A_ROW

        fake.configure(malformed_events=MAX_MALFORMED_IN_A_ROW + 1)
        with pytest.raises(SwitchyardError) as failure:
            await collect(adapter, fake, {"model": "x", "messages": MESSAGES})
        assert (failure.value.code, failure.value.status) == ("upstream_bad_stream", 502)


async def test_a_whole_answer_gets_the_first_byte_timeout(adapter: OpenAICompat,
                                                          fake: FakeUpstream) -> None:
    fake.configure(error_rate=1.0, fail_mode="hang")
    started = asyncio.get_running_loop().time()
    with pytest.raises(SwitchyardError) as failure:
        await adapter.complete(route(fake, ttft_s=0.3, total_s=30),
                               {"model": "x", "messages": MESSAGES}, "r")
    assert asyncio.get_running_loop().time() - started < 2
    assert (failure.value.code, failure.value.status) == ("upstream_timeout", 504)
    assert "first byte" in failure.value.message
    assert not failure.value.transient  # another wait on a silent route: failed over instead


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_connection_closed_before_the_headers_is_transient(
        adapter: OpenAICompat, fake: FakeUpstream, streamed: bool) -> None:
    fake.configure(fail_first=1, fail_mode="reset")
    body = {"model": "x", "messages": MESSAGES}
    call = collect(adapter, fake, body) if streamed else adapter.complete(route(fake), body, "r")
    with pytest.raises(SwitchyardError) as failure:
        await call
    assert (failure.value.code, failure.value.transient) == ("upstream_connection_reset", True)
    assert fake.stats.call_log[-1]["fault"] == "reset"
    await collect(adapter, fake, body)  # the next call is answered


@pytest.mark.parametrize("streamed", [False, True])
async def test_an_error_status_carries_its_retry_after(
        adapter: OpenAICompat, fake: FakeUpstream, streamed: bool) -> None:
    fake.configure(error_rate=1.0, error_status=429, retry_after="7")
    body = {"model": "x", "messages": MESSAGES}
    call = collect(adapter, fake, body) if streamed else adapter.complete(route(fake), body, "r")
    with pytest.raises(SwitchyardError) as failure:
        await call
    assert (failure.value.status, failure.value.retry_after_s) == (429, 7.0)
    assert failure.value.transient
