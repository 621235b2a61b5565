"""The official `openai` SDK's Responses client pointed at Switchyard's `/v1/responses`:
answers whole and streamed (the SDK's `responses.stream` checks the event sequence),
instructions, message items and images, function calls, conversations continued with
`previous_response_id`, stored responses per tenant, errors in OpenAI's shape, billing; on a
route of the OpenAI dialect and on one of the Anthropic dialect (translated both ways)."""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
from aiohttp import web

from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from ingress.responses_translate import EventWriter, skeleton
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import client as tenancy_client
from tests.tenancy_util import ingress_behind_proxy, new_key, new_tenant, platform
from tests.wire_server import serving

OPENAI_ROUTE = "gpt-4o-mini"
ANTHROPIC_ROUTE = "claude-haiku-4-5"
BOTH = pytest.mark.parametrize("model", [OPENAI_ROUTE, ANTHROPIC_ROUTE])
TOOL: Any = {"type": "function", "name": "lookup", "description": "Look a word up.",
             "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                            "required": ["query"]}}
PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def fake_prompt_tokens(*texts: str) -> int:
    """The prompt the fake upstream reports: each text's words plus 4."""
    return sum(len(t.split()) + 4 for t in texts)


async def sent_messages(fake: FakeAdmin, model: str) -> list[Any]:
    """The messages the fake provider last received, in the OpenAI shape, whatever the
    dialect (an Anthropic body's system prompt put back in front)."""
    stats = await fake.stats()
    if model == OPENAI_ROUTE:
        messages: list[Any] = stats["last_chat"]["messages"]
        return messages
    body = stats["last_anthropic"]["body"]
    system = [{"role": "system", "content": "".join(b["text"] for b in body["system"])}] \
        if body.get("system") else []
    return system + [
        {**m, "content": "".join(b["text"] for b in m["content"])}
        if isinstance(m["content"], list) and all(b["type"] == "text" for b in m["content"])
        else m for m in body["messages"]]


# --- answers ------------------------------------------------------------------------------


@BOTH
async def test_a_string_input_is_answered_with_a_response(client: openai.AsyncOpenAI,
                                                          fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=6)
    response = await client.responses.create(model=model, input="alpha beta",
                                             instructions="be brief")
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert response.status == "completed"
    assert response.model == model
    assert [item.type for item in response.output] == ["message"]
    message = response.output[0]
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.content[0].type == "output_text"
    assert response.output_text == expected_content(user("alpha beta"), 6)
    assert response.instructions == "be brief"
    # The instructions reached the provider: they count in the prompt it reports.
    assert response.usage is not None
    assert response.usage.input_tokens == fake_prompt_tokens("be brief", "alpha beta")
    assert response.usage.output_tokens == 6
    assert response.usage.total_tokens == response.usage.input_tokens + 6


@BOTH
async def test_message_items_with_an_image_and_a_capped_answer(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=20)
    response = await client.responses.create(model=model, max_output_tokens=3, input=[
        {"role": "developer", "content": "answer in words"},
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "charlie what is this"},
            {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}",
             "detail": "auto"}]}])
    assert response.output_text == expected_content(user("charlie"), 3)
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"


@BOTH
async def test_a_streamed_answer_is_the_responses_event_sequence(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=5)
    kinds: list[str] = []
    numbers: list[int] = []
    async with client.responses.stream(model=model, input="delta echo",
                                       instructions="be brief") as stream:
        async for event in stream:
            kinds.append(event.type)
            numbers.append(event.sequence_number)
        response = await stream.get_final_response()
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert numbers == list(range(len(numbers)))
    assert response.output_text == expected_content(user("delta echo"), 5)
    assert response.status == "completed"
    assert response.model == model
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (
        fake_prompt_tokens("be brief", "delta echo"), 5)


@BOTH
async def test_a_function_call_round_trip_with_the_whole_input(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    asked: list[Any] = user("foxtrot please")
    first = await client.responses.create(model=model, input=asked, tools=[TOOL],
                                          tool_choice="auto", store=False)
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.type == "function_call"
    assert call.name == "lookup"
    assert orjson.loads(call.arguments) == {"query": "foxtrot"}
    assert call.call_id
    # The call goes back as it came, its result as a function_call_output item.
    given_back: list[Any] = [
        *asked, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "a dance"}]
    second = await client.responses.create(model=model, tools=[TOOL], input=given_back)
    assert second.output_text.startswith("foxtrot-0 ")
    sent = await sent_messages(fake, model)
    assert "a dance" in orjson.dumps(sent).decode()  # the result reached the provider


@BOTH
async def test_a_function_call_round_trip_with_previous_response_id(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    first = await client.responses.create(model=model, input="golf please", tools=[TOOL])
    call = first.output[-1]
    assert call.type == "function_call"
    second = await client.responses.create(
        model=model, tools=[TOOL], previous_response_id=first.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "a sport"}])
    assert second.previous_response_id == first.id
    assert second.output_text.startswith("golf-0 ")
    sent = orjson.dumps(await sent_messages(fake, model)).decode()
    assert "golf please" in sent
    assert "a sport" in sent
    assert call.call_id in sent


async def test_a_streamed_function_call_arrives_as_argument_deltas(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    deltas: list[str] = []
    async with client.responses.stream(model=OPENAI_ROUTE, input="hotel",
                                       tools=[TOOL]) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                deltas.append(event.delta)
        response = await stream.get_final_response()
    assert len(deltas) > 1
    assert orjson.loads("".join(deltas)) == {"query": "hotel"}
    call = response.output[-1]
    assert call.type == "function_call"
    assert (call.name, orjson.loads(call.arguments)) == ("lookup", {"query": "hotel"})


async def test_a_streamed_answer_cut_at_max_output_tokens_ends_incomplete(
        client: openai.AsyncOpenAI, gateway: Gateway, api_key: str, fake: FakeAdmin) -> None:
    await fake.configure(tokens=20)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                 headers={"Authorization": f"Bearer {api_key}"}) as raw, \
            raw.stream("POST", "/v1/responses", json={
                "model": OPENAI_ROUTE, "stream": True, "max_output_tokens": 4,
                "input": "echo"}) as r:
        data = [orjson.loads(line[len("data: "):]) async for line in r.aiter_lines()
                if line.startswith("data: ")]
    last = data[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    assert last["response"]["output"][0]["content"][0]["text"] == \
        expected_content(user("echo"), 4)


async def test_tool_choice_parallel_calls_and_a_json_schema_reach_the_provider(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    other: Any = {**TOOL, "name": "define"}
    response = await client.responses.create(
        model=OPENAI_ROUTE, input="kilo", tools=[TOOL, other],
        tool_choice={"type": "function", "name": "define"}, parallel_tool_calls=False,
        temperature=0.5, top_p=0.9, max_output_tokens=99, user="u-7")
    call = response.output[-1]
    assert call.type == "function_call"
    assert call.name == "define"
    sent = (await fake.stats())["last_chat"]
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "define"}}
    assert [t["function"]["name"] for t in sent["tools"]] == ["lookup", "define"]
    assert sent["tools"][0]["function"]["parameters"] == TOOL["parameters"]
    assert (sent["parallel_tool_calls"], sent["temperature"], sent["top_p"],
            sent["user"]) == (False, 0.5, 0.9, "u-7")
    assert 99 in (sent.get("max_tokens"), sent.get("max_completion_tokens"))
    schema: Any = {"type": "object", "properties": {"word": {"type": "string"}}}
    shaped = await client.responses.create(
        model=OPENAI_ROUTE, input="lima", text={"format": {
            "type": "json_schema", "name": "word", "schema": schema, "strict": True}})
    assert orjson.loads(shaped.output_text)["word"] == "lima"
    sent = (await fake.stats())["last_chat"]
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "word", "schema": schema, "strict": True}}


async def test_auto_lets_the_router_choose_for_a_responses_client(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    response = await client.responses.create(model="auto", input="mike what is two plus two")
    assert response.model not in ("", "auto")  # the model that answered
    assert response.output_text.startswith("mike-0 ")


# --- conversations ------------------------------------------------------------------------


@BOTH
async def test_previous_response_id_continues_the_conversation(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=3)
    first = await client.responses.create(model=model, input="india one",
                                          instructions="first rules")
    second = await client.responses.create(model=model, input="juliet two",
                                           previous_response_id=first.id,
                                           instructions="second rules")
    third = await client.responses.create(model=model, input="kilo three",
                                          previous_response_id=second.id)
    assert third.output_text == expected_content(user("kilo"), 3)
    # Every earlier turn reached the provider, in order; instructions are not carried over.
    assert await sent_messages(fake, model) == [
        {"role": "user", "content": "india one"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "juliet two"},
        {"role": "assistant", "content": second.output_text},
        {"role": "user", "content": "kilo three"}]


async def test_a_streamed_response_is_stored_and_continued(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    async with client.responses.stream(model=OPENAI_ROUTE, input="lima",
                                       metadata={"topic": "radio"}) as stream:
        streamed = await stream.get_final_response()
    stored = await client.responses.retrieve(streamed.id)
    assert stored.output_text == streamed.output_text
    assert stored.metadata == {"topic": "radio"}
    assert stored.status == "completed"
    await client.responses.create(model=OPENAI_ROUTE, input="mike",
                                  previous_response_id=streamed.id)
    assert [m["content"] for m in await sent_messages(fake, OPENAI_ROUTE)] == [
        "lima", streamed.output_text, "mike"]


async def test_store_false_is_neither_retrievable_nor_continued(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    response = await client.responses.create(model=OPENAI_ROUTE, input="november",
                                             store=False)
    assert response.output_text
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError) as failure:
        await client.responses.create(model=OPENAI_ROUTE, input="oscar",
                                      previous_response_id=response.id)
    body: Any = failure.value.body
    assert body["code"] == "previous_response_not_found"
    assert body["param"] == "previous_response_id"


async def test_a_deleted_response_is_gone(client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    response = await client.responses.create(model=OPENAI_ROUTE, input="papa")
    assert (await client.responses.retrieve(response.id)).id == response.id
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(response.id)


async def test_another_tenants_response_is_not_found(
        gateway: Gateway, pg: asyncpg.Pool, client: openai.AsyncOpenAI,
        fake: FakeAdmin) -> None:
    mine = await client.responses.create(model=OPENAI_ROUTE, input="quebec")
    async with platform(pg, gateway) as admin:
        tenant = await new_tenant(admin.http)
        key = await new_key(admin.http, tenant.id)
    stranger = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key["key"],
                                  max_retries=0)
    try:
        with pytest.raises(openai.NotFoundError) as retrieved:
            await stranger.responses.retrieve(mine.id)
        with pytest.raises(openai.NotFoundError):
            await stranger.responses.create(model=OPENAI_ROUTE, input="romeo",
                                            previous_response_id=mine.id)
        with pytest.raises(openai.NotFoundError):
            await stranger.responses.delete(mine.id)
    finally:
        await stranger.close()
    body: Any = retrieved.value.body
    assert body["code"] == "response_not_found"
    assert (await client.responses.retrieve(mine.id)).id == mine.id  # still the owner's


async def test_stored_responses_are_a_503_while_redis_is_unreachable(
        gateway: Gateway, api_key: str, fake: FakeAdmin,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """An outage, said as one (503 with Retry-After), never a 404 that would tell the client
    its conversation is gone."""
    async with ingress_behind_proxy(gateway, tmp_path_factory.mktemp("cut")) as (url, proxy), \
            tenancy_client(url, api_key) as http:
        stored = await http.post("/v1/responses", json={"model": OPENAI_ROUTE,
                                                        "input": "oscar"})
        assert stored.status_code == 200, stored.text
        response_id = stored.json()["id"]
        await proxy.cut()
        fetched = await http.get(f"/v1/responses/{response_id}")
        continued = await http.post("/v1/responses", json={
            "model": OPENAI_ROUTE, "input": "papa", "previous_response_id": response_id})
    for refused in (fetched, continued):
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1


# --- errors -------------------------------------------------------------------------------


async def test_an_unknown_model_is_the_sdks_not_found_error(client: openai.AsyncOpenAI,
                                                            fake: FakeAdmin) -> None:
    with pytest.raises(openai.NotFoundError) as failure:
        await client.responses.create(model="no-such-model", input="sierra")
    body: Any = failure.value.body
    assert body["code"] == "model_not_found"
    assert body["type"] == "invalid_request_error"


async def test_untranslatable_input_is_a_400_naming_it(client: openai.AsyncOpenAI,
                                                       fake: FakeAdmin) -> None:
    with pytest.raises(openai.BadRequestError) as failure:
        await client.responses.create(model=OPENAI_ROUTE, tools=[{"type": "web_search"}],
                                      input="tango")
    body: Any = failure.value.body
    assert body["param"] == "tools.0.type"
    with pytest.raises(openai.BadRequestError) as failure:
        await client.responses.create(model=OPENAI_ROUTE, input=[
            {"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}])
    body = failure.value.body
    assert body["param"] == "input.0.content.0.type"
    assert (await fake.stats())["requests_total"] == 0  # no provider was asked


async def test_a_provider_failure_before_the_answer_is_an_http_error(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    await fake.configure(fail_models=[OPENAI_ROUTE])
    with pytest.raises(openai.APIStatusError) as failure:
        await client.responses.create(model=OPENAI_ROUTE, input="uniform", stream=True,
                                      extra_body={"switchyard": {"mode": "fixed"}})
    assert failure.value.status_code >= 500


@BOTH
async def test_a_provider_failure_mid_stream_is_response_failed(
        client: openai.AsyncOpenAI, fake: FakeAdmin, model: str) -> None:
    await fake.configure(tokens=50, cut_after_tokens=10, inter_token_ms=2)
    texts: list[str] = []
    failed: list[Any] = []
    async with client.responses.stream(model=model, input="victor") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                texts.append(event.delta)
            elif event.type == "response.failed":
                failed.append(event.response)
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await stream.get_final_response()
    assert len(texts) == 10  # what was sent stays sent
    assert len(failed) == 1
    response = failed[0]
    assert response.status == "failed"
    assert response.error is not None
    assert response.error.code == "upstream_stream_cut"
    with pytest.raises(openai.NotFoundError):  # a failed response is not stored
        await client.responses.retrieve(response.id)


# --- billing ------------------------------------------------------------------------------


@BOTH
async def test_usage_is_billed_like_a_chat_completion(
        client: openai.AsyncOpenAI, fake: FakeAdmin, pg: asyncpg.Pool, model: str) -> None:
    await fake.configure(tokens=7, prompt_tokens_override=400, cached_tokens=100)
    raw = await client.responses.with_raw_response.create(model=model, input="whiskey")
    response = raw.parse()
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.input_tokens_details.cached_tokens,
            response.usage.output_tokens) == (400, 100, 7)
    request_id = raw.headers["x-request-id"]
    rows = await eventually(lambda: pg.fetch(
        "SELECT model, status, prompt_tokens, completion_tokens, cached_tokens, cost_usd "
        "FROM usage_events WHERE request_id = $1", request_id))
    assert len(rows) == 1
    row = rows[0]
    assert (row["model"], row["status"], row["prompt_tokens"], row["completion_tokens"],
            row["cached_tokens"]) == (model, "ok", 400, 7, 100)
    assert row["cost_usd"] > Decimal(0)


async def test_a_streamed_response_is_billed(client: openai.AsyncOpenAI, fake: FakeAdmin,
                                             pg: asyncpg.Pool) -> None:
    await fake.configure(tokens=4, prompt_tokens_override=50)
    async with client.responses.stream(model=OPENAI_ROUTE, input="xray") as stream:
        response = await stream.get_final_response()
        request_id = stream._response.headers["x-request-id"]  # the SDK keeps it there
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (50, 4)
    rows = await eventually(lambda: pg.fetch(
        "SELECT prompt_tokens, completion_tokens FROM usage_events WHERE request_id = $1",
        request_id))
    assert [(r["prompt_tokens"], r["completion_tokens"]) for r in rows] == [(50, 4)]


async def test_rate_limits_refuse_in_openais_shape(gateway: Gateway, pg: asyncpg.Pool,
                                                   fake: FakeAdmin) -> None:
    async with platform(pg, gateway) as admin:
        tenant = await new_tenant(admin.http, tier="growth")
        response = await admin.http.put(f"/v1/tenants/{tenant.id}/limits",
                                        json={"requests_per_minute": 1})
        assert response.status_code == 200, response.text
        key = await new_key(admin.http, tenant.id)
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key["key"], max_retries=0)
    try:
        assert await sdk.responses.create(model=OPENAI_ROUTE, input="yankee")
        with pytest.raises(openai.RateLimitError) as limited:
            await sdk.responses.create(model=OPENAI_ROUTE, input="zulu")
    finally:
        await sdk.close()
    body: Any = limited.value.body
    assert body["code"] == "rate_limit_exceeded"


# --- the event writer, read by the SDK ----------------------------------------------------


async def test_text_then_two_function_calls_stream_as_three_items() -> None:
    """What the event writer makes of a chunk stream with text and parallel tool calls, as
    the official SDK's stream helper reads it off the wire."""
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
    writer = EventWriter(skeleton({"model": "m"}, "resp_1"))
    wire = b"".join(writer.start()) + b"".join(e for c in chunks for e in writer.chunk(c))
    wire += b"".join(writer.end({"prompt_tokens": 9, "completion_tokens": 4}))

    async def replay(_request: web.Request) -> web.StreamResponse:
        return web.Response(body=wire, content_type="text/event-stream")

    async with serving("/responses", replay) as origin:
        sdk = openai.AsyncOpenAI(base_url=origin, api_key="k", max_retries=0)
        try:
            async with sdk.responses.stream(model="m", input="x") as stream:
                response = await stream.get_final_response()
        finally:
            await sdk.close()
    assert [item.type for item in response.output] == ["message", "function_call",
                                                       "function_call"]
    text, first, second = response.output
    assert text.type == "message"
    assert response.output_text == "Let me look."
    assert first.type == "function_call"
    assert second.type == "function_call"
    assert (first.call_id, first.name, orjson.loads(first.arguments)) == (
        "call_0", "tool0", {"a": 1})
    assert (second.call_id, second.name, orjson.loads(second.arguments)) == (
        "call_1", "tool1", {"b": 2})
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (9, 4)
    assert response.id == "resp_1"


async def test_a_raw_stream_ends_with_response_completed(gateway: Gateway, api_key: str,
                                                         fake: FakeAdmin) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                 headers={"Authorization": f"Bearer {api_key}"}) as raw, \
            raw.stream("POST", "/v1/responses", json={"model": OPENAI_ROUTE, "stream": True,
                                                      "input": "alpha"}) as r:
        lines = [line async for line in r.aiter_lines() if line.startswith("event:")]
    assert lines[0] == "event: response.created"
    assert lines[-1] == "event: response.completed"

