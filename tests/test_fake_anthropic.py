"""The fake's Anthropic dialect must be indistinguishable from Anthropic to the official SDK:
every response and every stream event it emits is parsed by `anthropic.AsyncAnthropic`."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import anthropic
import httpx2
import orjson
import pytest
import pytest_asyncio
from anthropic.types import (
    MessageParam,
    RawContentBlockDeltaEvent,
    RawContentBlockStartEvent,
    RawContentBlockStopEvent,
    RawMessageDeltaEvent,
    RawMessageStartEvent,
    RawMessageStopEvent,
    TextBlock,
    ToolParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
)
from pydantic import BaseModel

from compose.fake_state import FakeConfig
from compose.fake_upstream import FakeUpstream
from tests.test_fake_upstream import JUDGE_KEY, JUDGE_PROMPT, check_verdict

MODEL = "claude-test"
SYSTEM = "be brief"
MSGS: list[MessageParam] = [{"role": "user", "content": "hello there world"}]
# "be brief" (2 words) + "hello there world" (3 words), plus 4 per text.
PROMPT_TOKENS = 13
TOOLS: list[ToolParam] = [{"name": "lookup", "description": "Look a word up.",
                           "input_schema": {"type": "object",
                                            "properties": {"query": {"type": "string"}}}}]
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def answer(word: str, tokens: int) -> str:
    return "".join(f"{word}-{i} " for i in range(tokens))


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=5)) as upstream:
        yield upstream


@pytest_asyncio.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[anthropic.AsyncAnthropic]:
    # No /v1: the SDK appends it. Retries would hide what the fake really sent.
    sdk = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key="sk-ant-x", max_retries=0)
    yield sdk
    await sdk.close()


async def _wait_for(predicate: Any, within: float = 2.0) -> None:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def _raw_error(fake: FakeUpstream) -> dict[str, Any]:
    """The error body the fake sends now, read without the SDK."""
    async with aiohttp.ClientSession() as http, http.post(
            f"{fake.url}/messages", headers={"anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 10, "messages": MSGS}) as resp:
        assert resp.status >= 400
        body: dict[str, Any] = await resp.json()
        return body


async def _stream_text(client: anthropic.AsyncAnthropic, into: list[str]) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS) as stream:
        async for text in stream.text_stream:
            into.append(text)


async def test_text_message(client: anthropic.AsyncAnthropic, fake: FakeUpstream) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=100, system=SYSTEM,
                                       messages=MSGS)
    assert msg.type == "message"
    assert msg.role == "assistant"
    assert msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert len(msg.content) == 1
    assert isinstance(msg.content[0], TextBlock)
    assert msg.content[0].text == answer("hello", 5)
    assert (msg.stop_reason, msg.stop_sequence) == ("end_turn", None)
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert msg.usage.cache_read_input_tokens == 0
    assert fake.stats.last_authorization == "Bearer sk-ant-x"  # the 2.x SDKs send Bearer


async def test_max_tokens_cuts_the_answer(client: anthropic.AsyncAnthropic) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=2, messages=MSGS)
    assert msg.stop_reason == "max_tokens"
    assert isinstance(msg.content[0], TextBlock)
    assert msg.content[0].text == answer("hello", 2)


async def test_stream_helper(client: anthropic.AsyncAnthropic, fake: FakeUpstream) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=100, system=SYSTEM,
                                      messages=MSGS) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == answer("hello", 5)
    assert isinstance(final.content[0], TextBlock)
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (PROMPT_TOKENS, 5)
    assert fake.stats.completed_streams == 1
    assert fake.stats.open_streams == 0


async def test_raw_stream_event_sequence(client: anthropic.AsyncAnthropic) -> None:
    stream = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS,
                                          stream=True)
    events = [event async for event in stream]
    kinds = [type(e) for e in events]
    assert kinds == [RawMessageStartEvent, RawContentBlockStartEvent,
                     *[RawContentBlockDeltaEvent] * 5, RawContentBlockStopEvent,
                     RawMessageDeltaEvent, RawMessageStopEvent]
    start = events[0]
    assert isinstance(start, RawMessageStartEvent)
    assert start.message.content == []
    assert start.message.stop_reason is None
    deltas = [e.delta for e in events if isinstance(e, RawContentBlockDeltaEvent)]
    assert "".join(d.text for d in deltas if d.type == "text_delta") == answer("hello", 5)
    delta = events[-2]
    assert isinstance(delta, RawMessageDeltaEvent)
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 5


async def test_wire_format_has_named_events_and_ping(fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession() as http, http.post(
            f"{fake.url}/messages", headers={"anthropic-version": "2023-06-01"},
            json={"model": MODEL, "max_tokens": 10, "stream": True, "messages": MSGS}) as resp:
        raw = (await resp.read()).decode()
    frames = [f for f in raw.split("\n\n") if f]
    names = [f.splitlines()[0] for f in frames]
    assert names[:3] == ["event: message_start", "event: content_block_start", "event: ping"]
    assert names[-1] == "event: message_stop"
    for frame in frames:  # each event's data names the same type as its event line
        event, data = frame.splitlines()
        assert orjson.loads(data.removeprefix("data: "))["type"] == event.removeprefix("event: ")


async def test_multipart_input_accepted(client: anthropic.AsyncAnthropic) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=[{
        "role": "user", "content": [
            {"type": "text", "text": "look"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}},
            {"type": "text", "text": "here please"}]}])
    # Text blocks are joined, as the OpenAI fake joins text parts.
    assert isinstance(msg.content[0], TextBlock)
    assert msg.content[0].text == answer("lookhere", 5)


async def test_tool_use_out_and_result_in(client: anthropic.AsyncAnthropic) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS, tools=TOOLS)
    assert msg.stop_reason == "tool_use"
    [block] = msg.content
    assert isinstance(block, ToolUseBlock)
    assert (block.name, block.input) == ("lookup", {"query": "hello"})
    assert block.id.startswith("toolu_")
    call: ToolUseBlockParam = {"type": "tool_use", "id": block.id, "name": block.name,
                               "input": block.input}
    result: ToolResultBlockParam = {"type": "tool_result", "tool_use_id": block.id,
                                    "content": "a greeting"}
    follow_up: list[MessageParam] = [*MSGS, {"role": "assistant", "content": [call]},
                                     {"role": "user", "content": [result]}]
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=follow_up,
                                       tools=TOOLS)
    assert msg.stop_reason == "end_turn"
    # The answer follows the last user text, not the tool result.
    assert isinstance(msg.content[0], TextBlock)
    assert msg.content[0].text == answer("hello", 5)


async def test_tool_use_streamed(client: anthropic.AsyncAnthropic) -> None:
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS, tools=TOOLS,
                                      tool_choice={"type": "tool", "name": "lookup"}) as stream:
        partials = [e.partial_json async for e in stream if e.type == "input_json"]
        final = await stream.get_final_message()
    assert orjson.loads("".join(partials)) == {"query": "hello"}
    [block] = final.content
    assert isinstance(block, ToolUseBlock)
    assert block.input == {"query": "hello"}
    assert final.stop_reason == "tool_use"


async def test_tool_choice_none_answers_in_text(client: anthropic.AsyncAnthropic) -> None:
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS, tools=TOOLS,
                                       tool_choice={"type": "none"})
    assert isinstance(msg.content[0], TextBlock)
    assert msg.stop_reason == "end_turn"


class Word(BaseModel):
    word: str
    tokens: int


async def test_json_mode_structured_output(client: anthropic.AsyncAnthropic) -> None:
    parsed = await client.messages.parse(model=MODEL, max_tokens=100, messages=MSGS,
                                         output_format=Word)
    assert parsed.parsed_output == Word(word="hello", tokens=5)
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS,
                                      output_config={"format": {
                                          "type": "json_schema",
                                          "schema": Word.model_json_schema()}}) as stream:
        text = "".join([t async for t in stream.text_stream])
    assert orjson.loads(text) == {"word": "hello", "tokens": 5}


async def test_json_via_forced_tool(client: anthropic.AsyncAnthropic) -> None:
    tool: ToolParam = {"name": "json_response", "input_schema": {"type": "object"}}
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS, tools=[tool],
                                       tool_choice={"type": "tool", "name": "json_response"})
    [block] = msg.content
    assert isinstance(block, ToolUseBlock)
    assert block.name == "json_response"
    assert block.input == {"query": "hello"}


async def test_usage_with_cached_tokens(client: anthropic.AsyncAnthropic,
                                        fake: FakeUpstream) -> None:
    fake.configure(prompt_tokens_override=40, cached_tokens=30)
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS)
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens,
            msg.usage.cache_creation_input_tokens, msg.usage.output_tokens) == (10, 30, 0, 5)
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS) as stream:
        final = await stream.get_final_message()
    assert (final.usage.input_tokens, final.usage.cache_read_input_tokens) == (10, 30)


async def test_outage_is_529_overloaded(client: anthropic.AsyncAnthropic,
                                        fake: FakeUpstream) -> None:
    fake.configure(outage=True)
    sent = await _raw_error(fake)
    with pytest.raises(anthropic.OverloadedError) as err:
        await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS)
    assert isinstance(err.value, anthropic.InternalServerError)
    assert err.value.status_code == 529
    assert err.value.type == "overloaded_error"
    assert err.value.api_message == sent["error"]["message"]
    assert err.value.request_id is not None
    assert err.value.request_id.startswith("req_")
    with pytest.raises(anthropic.OverloadedError):
        async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS) as s:
            await s.get_final_message()
    assert fake.stats.errors_sent == 3


@pytest.mark.parametrize(("status", "exc", "etype"), [
    (429, anthropic.RateLimitError, "rate_limit_error"),
    (500, anthropic.InternalServerError, "api_error"),
    (401, anthropic.AuthenticationError, "authentication_error"),
    (400, anthropic.BadRequestError, "invalid_request_error"),
    (504, anthropic.GatewayTimeoutError, "timeout_error"),
])
async def test_injected_errors(client: anthropic.AsyncAnthropic, fake: FakeUpstream,
                               status: int, exc: type[anthropic.APIStatusError],
                               etype: str) -> None:
    fake.configure(error_rate=1, error_status=status)
    sent = await _raw_error(fake)
    assert sent["type"] == "error"
    assert sent["error"]["type"] == etype
    with pytest.raises(exc) as err:
        await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS)
    assert (err.value.status_code, err.value.type) == (status, etype)
    assert err.value.api_message == sent["error"]["message"]


async def test_stream_cut_mid_answer_raises(client: anthropic.AsyncAnthropic,
                                            fake: FakeUpstream) -> None:
    fake.configure(cut_after_tokens=2)
    texts: list[str] = []
    # The SDK does not wrap transport errors raised while iterating: its httpx2 error shows.
    with pytest.raises(httpx2.RemoteProtocolError):
        await _stream_text(client, texts)
    assert "".join(texts) == answer("hello", 2)
    stream = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS,
                                          stream=True)
    with pytest.raises(httpx2.RemoteProtocolError):
        _ = [event async for event in stream]
    assert fake.stats.cut_streams == 2
    assert fake.stats.completed_streams == 0
    await _wait_for(lambda: fake.stats.open_streams == 0)


async def test_client_disconnect_is_counted(client: anthropic.AsyncAnthropic,
                                            fake: FakeUpstream) -> None:
    fake.configure(inter_token_ms=200, tokens=50)
    async with client.messages.stream(model=MODEL, max_tokens=100, messages=MSGS) as stream:
        async for _ in stream.text_stream:
            break  # leaving the block closes the connection mid-answer
    await _wait_for(lambda: fake.stats.disconnects == 1)
    await _wait_for(lambda: fake.stats.open_streams == 0)
    assert fake.stats.completed_streams == 0


async def test_ttft_delays_the_first_event(client: anthropic.AsyncAnthropic,
                                           fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=300)
    started = time.monotonic()
    stream = await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS,
                                          stream=True)
    first = await anext(aiter(stream))
    assert isinstance(first, RawMessageStartEvent)
    assert time.monotonic() - started >= 0.3
    await stream.close()


async def test_request_validation(client: anthropic.AsyncAnthropic, fake: FakeUpstream) -> None:
    # The SDK speaks API version 2026-10-21, which removed the sampling parameters.
    with pytest.raises(anthropic.BadRequestError) as err:
        await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS,
                                     extra_body={"temperature": 0.5})
    assert err.value.type == "invalid_request_error"
    assert err.value.api_message is not None
    assert "temperature" in err.value.api_message
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "max_tokens": 10, "messages": MSGS}
        async with http.post(f"{fake.url}/messages", json=body) as resp:
            assert resp.status == 400
            assert "anthropic-version" in (await resp.json())["error"]["message"]
        async with http.post(f"{fake.url}/messages", json={**body, "temperature": 0.5},
                             headers={"anthropic-version": "2023-06-01"}) as resp:
            assert resp.status == 200  # 2023-06-01 still has temperature
        async with http.post(f"{fake.url}/messages", json={"model": MODEL, "messages": MSGS},
                             headers={"anthropic-version": "2023-06-01"}) as resp:
            error = await resp.json()
            assert resp.status == 400
            assert error["type"] == "error"
            assert error["error"]["type"] == "invalid_request_error"


async def test_request_ids_are_counted(client: anthropic.AsyncAnthropic,
                                       fake: FakeUpstream) -> None:
    await client.messages.create(model=MODEL, max_tokens=100, messages=MSGS,
                                 extra_headers={"X-Client-Request-Id": "r-1"})
    assert fake.stats.calls_by_request_id == {"r-1": 1}


async def test_per_model_judge_and_answer(client: anthropic.AsyncAnthropic,
                                          fake: FakeUpstream) -> None:
    # The model comes from the body: one fake hosts a judge, a fixed answer and a broken model.
    fake.configure(per_model={"claude-judge": {"judge_key": JUDGE_KEY},
                              "claude-fixed": {"answer": "Paris, of course."},
                              "claude-broken": {"outage": True}})
    judge: list[MessageParam] = [{"role": "user", "content": JUDGE_PROMPT}]
    msg = await client.messages.create(model="claude-judge", max_tokens=4, messages=judge)
    assert isinstance(msg.content[0], TextBlock)
    check_verdict(msg.content[0].text)
    async with client.messages.stream(model="claude-judge", max_tokens=100,
                                      messages=judge) as stream:
        pieces = [t async for t in stream.text_stream]
    assert len(pieces) > 3
    check_verdict("".join(pieces))
    async with client.messages.stream(model="claude-fixed", max_tokens=100,
                                      messages=MSGS) as stream:
        pieces = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert pieces == ["Paris, ", "of ", "course."]
    assert final.usage.output_tokens == 3
    with pytest.raises(anthropic.InternalServerError) as info:
        await client.messages.create(model="claude-broken", max_tokens=10, messages=MSGS)
    assert info.value.status_code == 529
    msg = await client.messages.create(model=MODEL, max_tokens=100, messages=judge)
    assert isinstance(msg.content[0], TextBlock)
    assert msg.content[0].text == answer("Question:", 5)
    assert fake.stats.calls_by_model == {"claude-judge": 2, "claude-fixed": 1,
                                         "claude-broken": 1, MODEL: 1}
