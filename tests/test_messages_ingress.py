"""The official `anthropic` SDK pointed at Switchyard's `/v1/messages`: answers whole and
streamed, tools, system prompts, images, errors in Anthropic's shape, billing, count_tokens;
on a route of the OpenAI dialect (translated both ways) and on one of the Anthropic dialect
(the client's own request sent natively: beta headers and cache_control untouched)."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import aiohttp
import anthropic
import asyncpg
import httpx
import orjson
import pytest
from aiohttp import web
from anthropic._constants import ANTHROPIC_API_VERSION

from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from ingress.messages_translate import EventWriter, to_chat_body
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import new_key, new_tenant, platform
from tests.wire_server import serving
from topics.anthropic import NATIVE
from topics.limits import estimate_prompt_tokens
from workers.providers.base import Route, Timeouts
from workers.providers.openai_compat import OpenAICompat

OPENAI_ROUTE = "gpt-4o-mini"
ANTHROPIC_ROUTE = "claude-haiku-4-5"  # upstream model claude-haiku-4-5 (catalog)
BOTH = pytest.mark.parametrize("model", [OPENAI_ROUTE, ANTHROPIC_ROUTE])
TOOL: Any = {"name": "lookup", "description": "Look a word up.",
             "input_schema": {"type": "object", "properties": {"query": {"type": "string"}},
                              "required": ["query"]}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


@pytest.fixture
async def claude(gateway: Gateway, api_key: str) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official Anthropic SDK, pointed at the gateway (it sends the key as x-api-key).
    No retries: we test what it sees."""
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=api_key, max_retries=0,
                                   timeout=60)
    yield sdk
    await sdk.close()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def fake_prompt_tokens(*texts: str) -> int:
    """The prompt the fake upstream reports: each text's words plus 4."""
    return sum(len(t.split()) + 4 for t in texts)


# --- answers ------------------------------------------------------------------------------


@BOTH
async def test_a_whole_answer_is_an_anthropic_message(claude: anthropic.AsyncAnthropic,
                                                      fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=6)
    message = await claude.messages.create(model=model, max_tokens=200,
                                           system="be brief", messages=user("alpha beta"))
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.id.startswith("msg_")
    assert message.model == model
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].type == "text"
    assert message.content[0].text == expected_content(user("alpha beta"), 6)
    assert message.stop_reason == "end_turn"
    # The system prompt reached the provider: it counts in the prompt the provider reports.
    assert message.usage.input_tokens == fake_prompt_tokens("be brief", "alpha beta")
    assert message.usage.output_tokens == 6


@BOTH
async def test_a_system_prompt_of_blocks_and_a_capped_answer(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=20)
    message = await claude.messages.create(
        model=model, max_tokens=3,
        system=[{"type": "text", "text": "be very brief"}, {"type": "text", "text": "please"}],
        messages=user("charlie"))
    assert message.content[0].type == "text"
    assert message.content[0].text == expected_content(user("charlie"), 3)
    assert message.stop_reason == "max_tokens"
    # Both blocks reached the provider: the fake counts an Anthropic request's blocks one by
    # one, an OpenAI message's text parts joined.
    blocks = ["be very brief", "please"] if model == ANTHROPIC_ROUTE else ["be very briefplease"]
    assert message.usage.input_tokens == fake_prompt_tokens(*blocks, "charlie")


@BOTH
async def test_a_streamed_answer_is_anthropics_event_sequence(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=5)
    kinds: list[str] = []
    async with claude.messages.stream(model=model, max_tokens=100, system="be brief",
                                      messages=user("delta echo")) as stream:
        async for event in stream:
            kinds.append(event.type)
        message = await stream.get_final_message()
    raw = [k for k in kinds if k not in ("text",)]  # the SDK's own derived events left out
    assert raw[0] == "message_start"
    assert raw[1] == "content_block_start"
    assert raw[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(raw[2:-3]) == {"content_block_delta"}
    assert message.content[0].type == "text"
    assert message.content[0].text == expected_content(user("delta echo"), 5)
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 5
    assert message.usage.input_tokens == fake_prompt_tokens("be brief", "delta echo")


@BOTH
async def test_a_tool_use_round_trip(claude: anthropic.AsyncAnthropic, fake: FakeAdmin,
                                     model: str) -> None:
    asked = user("foxtrot please")
    first = await claude.messages.create(model=model, max_tokens=200, tools=[TOOL],
                                         tool_choice={"type": "auto"}, messages=asked)
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert len(calls) == 1
    assert calls[0].name == "lookup"
    assert calls[0].input == {"query": "foxtrot"}
    # The answer goes back as the assistant's turn, the result as a tool_result block.
    followed: Any = [*asked, {"role": "assistant", "content": first.content},
                     {"role": "user", "content": [
                         {"type": "tool_result", "tool_use_id": calls[0].id,
                          "content": "a dance"}]}]
    second = await claude.messages.create(model=model, max_tokens=200, tools=[TOOL],
                                          messages=followed)
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"
    assert second.content[0].text.startswith("foxtrot-0 ")


@BOTH
async def test_a_streamed_tool_call_arrives_as_input_json_deltas(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin, model: str) -> None:
    deltas: list[str] = []
    async with claude.messages.stream(model=model, max_tokens=200, tools=[TOOL],
                                      messages=user("golf")) as stream:
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "input_json_delta":
                deltas.append(event.delta.partial_json)
        message = await stream.get_final_message()
    assert len(deltas) > 1
    assert orjson.loads("".join(deltas)) == {"query": "golf"}
    assert message.stop_reason == "tool_use"
    block = message.content[-1]
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("lookup", {"query": "golf"})


@BOTH
async def test_an_image_block_is_accepted(claude: anthropic.AsyncAnthropic, fake: FakeAdmin,
                                          model: str) -> None:
    await fake.configure(tokens=2)
    message = await claude.messages.create(model=model, max_tokens=50, messages=[
        {"role": "user", "content": [
            {"type": "text", "text": "hotel what is this"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": PNG}}]}])
    assert message.content[0].type == "text"
    assert message.content[0].text == "hotel-0 hotel-1 "


async def test_text_then_two_tool_calls_stream_as_three_blocks() -> None:
    """What the event writer makes of a chunk stream with text and parallel tool calls, as
    the official SDK reads it off the wire."""
    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"id": "chatcmpl-1", "model": "m", "choices": [
            {"index": 0, "delta": delta, "finish_reason": finish}]}

    def call(n: int, arguments: str, first: bool = False) -> dict[str, Any]:
        head = {"id": f"call_{n}", "type": "function"} if first else {}
        function = {"name": f"tool{n}", "arguments": arguments} if first \
            else {"arguments": arguments}
        return chunk({"tool_calls": [{"index": n, **head, "function": function}]})

    chunks = [chunk({"role": "assistant", "content": ""}), chunk({"content": "Let me "}),
              chunk({"content": "look."}), call(0, "", first=True), call(0, '{"a": '),
              call(0, "1}"), call(1, '{"b": 2}', first=True), chunk({}, "tool_calls")]
    writer = EventWriter()
    wire = b"".join(e for c in chunks for e in writer.chunk(c))
    wire += b"".join(writer.end({"prompt_tokens": 9, "completion_tokens": 4}))

    async def replay(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=wire, content_type="text/event-stream")

    async with serving("/v1/messages", replay) as origin:
        sdk = anthropic.AsyncAnthropic(base_url=origin, api_key="k", max_retries=0)
        try:
            async with sdk.messages.stream(model="m", max_tokens=9,
                                           messages=user("x")) as stream:
                message = await stream.get_final_message()
        finally:
            await sdk.close()
    assert [b.type for b in message.content] == ["text", "tool_use", "tool_use"]
    text, first, second = message.content
    assert text.type == "text"
    assert text.text == "Let me look."
    assert first.type == "tool_use"
    assert second.type == "tool_use"
    assert (first.id, first.name, first.input) == ("call_0", "tool0", {"a": 1})
    assert (second.id, second.name, second.input) == ("call_1", "tool1", {"b": 2})
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (9, 4)
    assert message.id == "msg_chatcmpl-1"


async def test_auto_lets_the_router_choose_for_a_messages_client(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin) -> None:
    message = await claude.messages.create(model="auto", max_tokens=50,
                                           messages=user("alpha what is two plus two"))
    assert message.model not in ("", "auto")  # the model that answered
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("alpha-0 ")


# --- pass-through to Anthropic routes -----------------------------------------------------


async def test_an_anthropic_route_gets_the_clients_own_request(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin) -> None:
    system: Any = [{"type": "text", "text": "a long shared preamble",
                    "cache_control": {"type": "ephemeral"}}]
    messages: Any = [{"role": "user", "content": [
        {"type": "text", "text": "india", "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]
    message = await claude.messages.create(
        model=ANTHROPIC_ROUTE, max_tokens=64, system=system, messages=messages,
        stop_sequences=["STOP"], metadata={"user_id": "u-42"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31,extended-cache-ttl"},
        extra_body={"thinking": {"type": "disabled"}})
    assert message.content[0].type == "text"
    assert message.content[0].text.startswith("india-0 ")

    seen = (await fake.stats())["last_anthropic"]
    assert seen["anthropic-beta"] == "prompt-caching-2024-07-31,extended-cache-ttl"
    assert seen["anthropic-version"] == ANTHROPIC_API_VERSION  # the SDK's, as it sent it
    sent = seen["body"]
    assert sent["system"] == system
    assert sent["messages"] == messages
    assert (sent["stop_sequences"], sent["metadata"], sent["thinking"]) == (
        ["STOP"], {"user_id": "u-42"}, {"type": "disabled"})
    assert sent["model"] == "claude-haiku-4-5"  # the route's upstream model
    assert sent["max_tokens"] == 64
    assert NATIVE not in sent


async def test_an_openai_route_gets_the_translation_without_the_native_request() -> None:
    """The OpenAI dialect drops the native request a Messages client's body carries."""
    seen: list[dict[str, Any]] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        seen.append(await request.json())
        return web.json_response({"id": "c1", "object": "chat.completion", "created": 1,
                                  "model": "m", "choices": [{
                                      "index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": "ok"}}]})

    anthropic_body: Any = {"model": "m", "max_tokens": 5, "messages": user("juliet")}
    body = {**to_chat_body(anthropic_body),
            NATIVE: {"protocol": "anthropic", "body": anthropic_body, "headers": {}}}
    async with serving("/v1/chat/completions", answer) as origin, \
            aiohttp.ClientSession() as http:
        route = Route("openai", "openai", f"{origin}/v1", "k", "m",
                      Timeouts(connect_s=2, ttft_s=5, idle_s=5, total_s=10))
        await OpenAICompat(http).complete(route, body, "r-1")
    assert NATIVE not in seen[0]
    assert seen[0]["messages"] == [{"role": "user", "content": "juliet"}]


# --- errors -------------------------------------------------------------------------------


async def test_an_unknown_model_is_anthropics_not_found_error(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin) -> None:
    with pytest.raises(anthropic.NotFoundError) as failure:
        await claude.messages.create(model="no-such-model", max_tokens=10,
                                     messages=user("kilo"))
    assert failure.value.status_code == 404
    body: Any = failure.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "not_found_error"
    assert "no-such-model" in body["error"]["message"]
    assert body["error"]["code"] == "model_not_found"  # ours, beside Anthropic's type
    assert body["request_id"] == failure.value.response.headers["x-request-id"]


async def test_a_malformed_request_is_anthropics_400(gateway: Gateway, api_key: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, headers={"x-api-key": api_key}) as raw:
        response = await raw.post("/v1/messages", json={"model": OPENAI_ROUTE,
                                                        "messages": user("lima")})
    assert response.status_code == 400  # max_tokens is required, as Anthropic requires it
    body = response.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


async def test_the_key_goes_in_x_api_key_and_a_bad_one_is_refused(
        gateway: Gateway, claude: anthropic.AsyncAnthropic, fake: FakeAdmin) -> None:
    message = await claude.messages.create(model=OPENAI_ROUTE, max_tokens=5,
                                           messages=user("mike"))
    assert message.content  # x-api-key let it through (the SDK sends no Authorization)
    stranger = anthropic.AsyncAnthropic(base_url=gateway.url, api_key="sy-not-a-key",
                                        max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError) as failure:
            await stranger.messages.create(model=OPENAI_ROUTE, max_tokens=5,
                                           messages=user("november"))
    finally:
        await stranger.close()
    body: Any = failure.value.body
    assert body["error"]["type"] == "authentication_error"


async def test_a_provider_failure_before_the_answer_is_an_anthropic_error(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin) -> None:
    await fake.configure(fail_models=[OPENAI_ROUTE])
    with pytest.raises(anthropic.APIStatusError) as failure:
        await claude.messages.create(
            model=OPENAI_ROUTE, max_tokens=10, messages=user("oscar"),
            extra_body={"switchyard": {"mode": "fixed"}})  # no failover to hide it
    assert failure.value.status_code >= 500
    body: Any = failure.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] in ("api_error", "overloaded_error")


@BOTH
async def test_a_provider_failure_mid_stream_is_an_error_event(
        claude: anthropic.AsyncAnthropic, gateway: Gateway, api_key: str, fake: FakeAdmin,
        model: str) -> None:
    await fake.configure(tokens=50, cut_after_tokens=10, inter_token_ms=2)
    texts: list[str] = []

    async def consume() -> None:
        async with claude.messages.stream(model=model, max_tokens=100,
                                          messages=user("papa")) as stream:
            async for text in stream.text_stream:
                texts.append(text)

    with pytest.raises(anthropic.APIStatusError) as failure:
        await consume()
    body: Any = failure.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "api_error"
    assert len(texts) == 10  # what was sent stays sent

    # On the wire: Anthropic's named error event ends the stream, never message_stop.
    async with httpx.AsyncClient(base_url=gateway.url, headers={"x-api-key": api_key},
                                 timeout=60) as raw, raw.stream(
            "POST", "/v1/messages", json={"model": model, "max_tokens": 100,
                                          "stream": True, "messages": user("quebec")}) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("event:")]
    assert lines[0] == "event: message_start"
    assert lines[-1] == "event: error"
    assert "event: message_stop" not in lines


async def test_limits_and_key_scopes_refuse_in_anthropics_shape(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    async with platform(pg, gateway) as admin:
        tenant = await new_tenant(admin.http, tier="growth")
        response = await admin.http.put(f"/v1/tenants/{tenant.id}/limits",
                                        json={"requests_per_minute": 1})
        assert response.status_code == 200, response.text
        scoped = await new_key(admin.http, tenant.id, allowed_models=[OPENAI_ROUTE])
    sdk = anthropic.AsyncAnthropic(base_url=gateway.url, api_key=scoped["key"], max_retries=0)
    try:
        with pytest.raises(anthropic.PermissionDeniedError) as denied:
            await sdk.messages.create(model=ANTHROPIC_ROUTE, max_tokens=5,
                                      messages=user("yankee"))
        assert await sdk.messages.create(model=OPENAI_ROUTE, max_tokens=5,
                                         messages=user("yankee"))
        with pytest.raises(anthropic.RateLimitError) as limited:
            await sdk.messages.create(model=OPENAI_ROUTE, max_tokens=5, messages=user("zulu"))
    finally:
        await sdk.close()
    refusals: Any = [denied.value.body, limited.value.body]
    assert [r["error"]["type"] for r in refusals] == ["permission_error", "rate_limit_error"]
    assert int(limited.value.response.headers["retry-after"]) > 0
    assert limited.value.response.headers["x-ratelimit-remaining-requests"] == "0"


# --- billing ------------------------------------------------------------------------------


@BOTH
async def test_usage_is_billed_like_a_chat_completion(
        claude: anthropic.AsyncAnthropic, fake: FakeAdmin, pg: asyncpg.Pool,
        model: str) -> None:
    await fake.configure(tokens=7, prompt_tokens_override=400, cached_tokens=100)
    response = await claude.messages.with_raw_response.create(
        model=model, max_tokens=50, messages=user("romeo"))
    message = await response.parse()
    # Cache reads apart from the other input, as Anthropic reports them.
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens,
            message.usage.output_tokens) == (300, 100, 7)
    request_id = response.headers["x-request-id"]
    assert response.headers["request-id"] == request_id
    assert message._request_id == request_id
    rows = await eventually(lambda: pg.fetch(
        "SELECT model, status, prompt_tokens, completion_tokens, cached_tokens, cost_usd "
        "FROM usage_events WHERE request_id = $1", request_id))
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["status"], row["prompt_tokens"], row["completion_tokens"],
            row["cached_tokens"]) == (model, "ok", 400, 7, 100)
    assert row["cost_usd"] > Decimal(0)


async def test_a_streamed_answer_is_billed(claude: anthropic.AsyncAnthropic, fake: FakeAdmin,
                                           pg: asyncpg.Pool) -> None:
    await fake.configure(tokens=4, prompt_tokens_override=50)
    async with claude.messages.stream(model=OPENAI_ROUTE, max_tokens=50,
                                      messages=user("sierra")) as stream:
        message = await stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (50, 4)
    rows = await eventually(lambda: pg.fetch(
        "SELECT prompt_tokens, completion_tokens FROM usage_events WHERE request_id = $1",
        request_id))
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(50, 4)]


# --- count_tokens -------------------------------------------------------------------------


async def test_count_tokens_is_the_admission_estimate(claude: anthropic.AsyncAnthropic,
                                                      fake: FakeAdmin) -> None:
    system = "you answer questions about the alphabet " * 5
    messages: Any = [{"role": "user", "content": "tango " * 40},
                     {"role": "assistant", "content": "uniform"},
                     {"role": "user", "content": "victor"}]
    counted = await claude.messages.count_tokens(model=ANTHROPIC_ROUTE, system=system,
                                                 messages=messages, tools=[TOOL])
    translated = to_chat_body({"model": ANTHROPIC_ROUTE, "max_tokens": 1, "system": system,
                               "messages": messages})
    assert counted.input_tokens == estimate_prompt_tokens(translated)
    assert counted.input_tokens > 60  # about four characters a token
    assert (await fake.stats())["requests_total"] == 0  # no provider was asked


async def test_count_tokens_of_an_unknown_model_is_not_found(
        claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.NotFoundError):
        await claude.messages.count_tokens(model="no-such-model", messages=user("whiskey"))


async def test_a_chat_completion_cannot_smuggle_a_native_request(
        http: httpx.AsyncClient) -> None:
    """Only the Messages ingress sets it: an Anthropic route would send it as it is."""
    response = await http.post("/v1/chat/completions", json={
        "model": ANTHROPIC_ROUTE, "messages": user("xray"),
        NATIVE: {"protocol": "anthropic", "body": {"max_tokens": 100000}}})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == NATIVE
