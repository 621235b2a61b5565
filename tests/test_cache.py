"""The response cache (docs/cache.md), with the official openai SDK on the real stack: a
repeated reproducible request is answered from Redis without calling a provider, as JSON or
as a replayed stream, with `metadata.cache_hit: true`, billed once at cost 0; `refresh`,
`off`, the TTL, sampled requests, failed streams and other tenants are never served a
stored answer they should not be."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest
import redis.asyncio as redis

from compose.gateway import Gateway
from state.response_cache import PREFIX
from state.tenancy import tenant_scope
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import Admin, Tenant, assert_error, new_tenant, platform
from topics.response_cache import cache_key

ON = {"x-switchyard-cache": "on"}


@pytest.fixture(scope="module")
async def admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


@pytest.fixture
async def tenant(admin: Admin) -> Tenant:
    return await new_tenant(admin.http, tier="growth")


def sdk(gateway: Gateway, tenant: Tenant) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=tenant.admin_key,
                              max_retries=0, timeout=60)


def ask(**extra: Any) -> dict[str, Any]:
    """A request no other test sends (its first word is what the fake answers with)."""
    word = f"w{uuid.uuid4().hex[:10]}"
    return {"model": "gpt-4o-mini", "temperature": 0,
            "messages": [{"role": "user", "content": f"{word} tell me"}], **extra}


async def complete(client: openai.AsyncOpenAI, body: dict[str, Any],
                   headers: dict[str, str] | None = None) -> tuple[str | None, dict[str, Any]]:
    """(the response's x-switchyard-cache header, the completion as JSON)."""
    raw = await client.chat.completions.with_raw_response.create(
        **body, extra_headers=headers or {})
    raw.parse()  # the SDK decodes it
    # As JSON: the SDK's model types `metadata` as OpenAI's string map.
    completion: dict[str, Any] = raw.http_response.json()
    return raw.headers.get("x-switchyard-cache"), completion


async def calls(fake: FakeAdmin) -> int:
    total: int = (await fake.stats())["requests_total"]
    return total


async def set_cache_policy(gateway: Gateway, tenant: Tenant, **cache: Any) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}"}) as http:
        response = await http.put("/v1/routing/policy", json={"cache": cache})
    assert response.status_code == 200, response.text
    assert response.json()["policy"]["cache"]["enabled"] is cache.get("enabled", False)


async def test_a_repeated_request_is_answered_from_the_cache_without_a_provider_call(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        before = await calls(fake)
        state, first = await complete(client, body, ON)
        assert state == "miss"
        assert first["metadata"]["cache_hit"] is False
        assert await calls(fake) == before + 1

        state, second = await complete(client, body, ON)
    assert state == "hit"
    assert await calls(fake) == before + 1  # no provider call for the hit
    assert second["metadata"]["cache_hit"] is True
    assert second["metadata"]["cost_usd"] == 0
    assert second["metadata"]["provider"] == first["metadata"]["provider"]
    assert second["choices"][0]["message"] == first["choices"][0]["message"]
    assert second["choices"][0]["finish_reason"] == first["choices"][0]["finish_reason"]
    assert second["usage"] == first["usage"]
    assert second["id"] != first["id"]  # a response of its own


async def test_refresh_calls_the_provider_and_replaces_the_entry(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        await complete(client, body, ON)
        before = await calls(fake)
        state, refreshed = await complete(client, body, {"x-switchyard-cache": "refresh"})
        assert state == "refresh"
        assert refreshed["metadata"]["cache_hit"] is False
        assert await calls(fake) == before + 1
        state, _ = await complete(client, body, ON)
    assert state == "hit"
    assert await calls(fake) == before + 1


async def test_a_tenant_policy_caches_without_a_header_and_off_opts_a_request_out(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        state, _ = await complete(client, body)
        assert state is None  # no policy, no header: the cache plays no part
        await set_cache_policy(gateway, tenant, enabled=True)
        before = await calls(fake)
        assert (await complete(client, body))[0] == "miss"
        assert (await complete(client, body))[0] == "hit"
        state, off = await complete(client, body, {"x-switchyard-cache": "off"})
        assert state is None
        assert off["metadata"]["cache_hit"] is False
    assert await calls(fake) == before + 2
    # The change is the tenant's routing policy: audited like any other (the audit worker
    # writes the trail a hop behind the answer).
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}"}) as http:
        async def audited() -> list[dict[str, Any]]:
            audit = await http.get("/v1/audit", params={"action": "routing_policy.updated"})
            entries: list[dict[str, Any]] = audit.json()["entries"]
            return entries

        entries = await eventually(audited)
    assert [e["details"]["policy"]["cache"]["enabled"] for e in entries] == [True]


async def test_an_entry_expires_after_its_ttl(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin, r: redis.Redis) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        headers = {**ON, "x-switchyard-cache-ttl": "1"}
        assert (await complete(client, body, headers))[0] == "miss"
        keys = [k async for k in r.scan_iter(match=f"{PREFIX}{tenant.id}:*")]
        assert len(keys) == 1
        assert 0 < await r.pttl(keys[0]) <= 1000

        async def expired() -> bool:
            return (await complete(client, body, headers))[0] == "miss"

        await eventually(expired, timeout_s=10, every_s=0.5)


async def test_a_bad_cache_header_is_refused(gateway: Gateway, tenant: Tenant) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}"}) as http:
        response = await http.post("/v1/chat/completions", json=ask(),
                                   headers={"x-switchyard-cache": "always"})
        assert_error(response, 400, "invalid_header")
        response = await http.post("/v1/chat/completions", json=ask(),
                                   headers={**ON, "x-switchyard-cache-ttl": "9999999"})
        assert_error(response, 400, "invalid_header")


async def test_sampled_requests_are_not_cached_unless_the_tenant_allows_it(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    del body["temperature"]  # the provider's default, 1: the answer is sampled
    async with sdk(gateway, tenant) as client:
        before = await calls(fake)
        assert (await complete(client, body, ON))[0] == "bypass"
        assert (await complete(client, {**body, "temperature": 0.7}, ON))[0] == "bypass"
        assert await calls(fake) == before + 2
        await set_cache_policy(gateway, tenant, allow_nondeterministic=True)
        assert (await complete(client, body, ON))[0] == "miss"
        assert (await complete(client, body, ON))[0] == "hit"
    assert await calls(fake) == before + 3


async def test_a_hit_is_replayed_as_a_stream(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask(stream_options={"include_usage": True})
    async with sdk(gateway, tenant) as client:
        live = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        live_chunks = [chunk async for chunk in live]
        before = await calls(fake)
        raw = await client.chat.completions.with_raw_response.create(
            **body, stream=True, extra_headers=ON)
        assert raw.headers["x-switchyard-cache"] == "hit"
        replayed = [chunk async for chunk in raw.parse()]
        # A non-streamed request is served the same stored answer.
        state, whole = await complete(client, body, ON)
    assert await calls(fake) == before
    assert state == "hit"

    def text(chunks: list[Any]) -> str:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    assert text(replayed) == text(live_chunks) == whole["choices"][0]["message"]["content"]
    assert text(replayed)  # the fake's answer is not empty
    assert all(c.object == "chat.completion.chunk" for c in replayed)
    assert replayed[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in replayed if c.choices]
    assert finishes[-1] == live_chunks[-2].choices[0].finish_reason == "stop"
    usage = replayed[-1]  # include_usage: the last chunk has no choices, the usage
    assert usage.choices == []
    assert usage.usage is not None
    assert usage.usage == live_chunks[-1].usage
    assert (usage.model_extra or {})["metadata"]["cache_hit"] is True

    # On the wire: SSE `data:` events ending with [DONE], nothing after it.
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}", **ON}) as http:
        response = await http.post("/v1/chat/completions", json={**body, "stream": True})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line for line in response.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(orjson.loads(e.removeprefix("data: "))["object"] == "chat.completion.chunk"
               for e in events[:-1])


async def test_a_streamed_miss_is_stored_and_served_to_a_non_streamed_request(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        live = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        content = "".join([c.choices[0].delta.content or "" async for c in live if c.choices])
        before = await calls(fake)
        state, whole = await complete(client, body, ON)
    assert state == "hit"
    assert await calls(fake) == before
    assert whole["choices"][0]["message"]["content"] == content
    assert whole["choices"][0]["finish_reason"] == "stop"
    assert whole["usage"]["completion_tokens"] > 0


async def test_a_failed_stream_is_not_stored(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    await fake.configure(cut_after_tokens=3)
    async with sdk(gateway, tenant) as client:
        stream = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        with pytest.raises(openai.APIError):
            _ = [chunk async for chunk in stream]  # the provider cuts it after 3 tokens
        await fake.configure(cut_after_tokens=None)
        before = await calls(fake)
        state, _ = await complete(client, body, ON)
    assert state == "miss"
    assert await calls(fake) == before + 1


async def test_a_stream_its_client_left_is_not_stored(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask()
    await fake.configure(tokens=40, inter_token_ms=50)
    async with sdk(gateway, tenant) as client:
        stream = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                break  # the first words, then the client goes away
        await stream.close()
        await eventually(lambda: _no_open_streams(fake))  # the router saw the cancel
        await fake.configure(tokens=16, inter_token_ms=0)
        before = await calls(fake)
        state, _ = await complete(client, body, ON)
    assert state == "miss"
    assert await calls(fake) == before + 1


async def _no_open_streams(fake: FakeAdmin) -> bool:
    stats = await fake.stats()
    return bool(stats["open_streams"] == 0 and stats["disconnects"] >= 1)


async def test_tenants_never_see_each_others_entries(
        gateway: Gateway, admin: Admin, fake: FakeAdmin, r: redis.Redis) -> None:
    first, second = await new_tenant(admin.http), await new_tenant(admin.http)
    body = ask()
    async with sdk(gateway, first) as a, sdk(gateway, second) as b:
        assert (await complete(a, body, ON))[0] == "miss"
        assert (await complete(a, body, ON))[0] == "hit"
        before = await calls(fake)
        assert (await complete(b, body, ON))[0] == "miss"  # the same request, another tenant
        assert await calls(fake) == before + 1
        assert (await complete(b, body, ON))[0] == "hit"
    # Each tenant's entry is under its own id, and the digests differ too.
    for tenant in (first, second):
        assert len([k async for k in r.scan_iter(match=f"{PREFIX}{tenant.id}:*")]) == 1
    assert cache_key(first.id, "chat.completions", body, {}, None) != \
        cache_key(second.id, "chat.completions", body, {}, None)


async def ledger(pg: asyncpg.Pool, tenant_id: str) -> list[asyncpg.Record]:
    async with tenant_scope(pg, tenant_id) as conn:
        rows: list[asyncpg.Record] = await conn.fetch(
            "SELECT request_id, cache_hit, cost_usd, prompt_tokens, completion_tokens, status"
            " FROM usage_events WHERE tenant_id = $1 ORDER BY started_at", tenant_id)
    return rows


async def test_a_hit_is_billed_once_at_cost_zero(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        await complete(client, body, ON)
        raw = await client.chat.completions.with_raw_response.create(**body, extra_headers=ON)
        hit_id = raw.headers["x-request-id"]
        assert raw.headers["x-switchyard-cache"] == "hit"

    rows = await eventually(lambda: _two_rows(pg, tenant.id), timeout_s=30)
    cached = [row for row in rows if row["cache_hit"]]
    assert len(cached) == 1
    (row,) = cached
    assert row["request_id"] == hit_id
    assert row["cost_usd"] == Decimal(0)
    assert (row["prompt_tokens"], row["completion_tokens"], row["status"]) == (0, 0, "ok")
    assert [r["cache_hit"] for r in rows] == [False, True]
    assert rows[0]["cost_usd"] > 0

    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}"}) as http:
        usage = (await http.get("/v1/usage")).json()
    assert usage["total_requests"] == 2  # the hit is a request, of cost 0
    assert Decimal(str(usage["total_cost_usd"])) == rows[0]["cost_usd"]
    await asyncio.sleep(1)  # (a duplicate would have arrived with the first)
    assert len(await ledger(pg, tenant.id)) == 2


async def _two_rows(pg: asyncpg.Pool, tenant_id: str) -> list[asyncpg.Record] | None:
    rows = await ledger(pg, tenant_id)
    return rows if len(rows) >= 2 else None


def metric(text: str, line_start: str) -> float:
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.split()[-1])
    return 0.0


async def test_lookups_and_stores_are_counted(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    names = ('switchyard_cache_lookups_total{outcome="hit"}',
             'switchyard_cache_lookups_total{outcome="miss"}', "switchyard_cache_stores_total")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        before = (await http.get("/metrics")).text
        async with sdk(gateway, tenant) as client:
            body = ask()
            await complete(client, body, ON)
            await complete(client, body, ON)
        after = (await http.get("/metrics")).text
    assert [metric(after, n) - metric(before, n) for n in names] == [1, 1, 1]


async def test_a_hit_counts_as_a_request_of_the_rate_limits_and_holds_no_slot(
        gateway: Gateway, tenant: Tenant, admin: Admin, fake: FakeAdmin) -> None:
    response = await admin.http.put(f"/v1/tenants/{tenant.id}/limits", json={
        "requests_per_minute": 4, "concurrent_requests": 2, "requests_per_second": 0})
    assert response.status_code == 200, response.text
    body = ask()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant.admin_key}", **ON}) as http:
        first = await http.post("/v1/chat/completions", json=body)
        assert first.headers["x-switchyard-cache"] == "miss"
        hits = [await http.post("/v1/chat/completions", json=body) for _ in range(3)]
        # Three after one another within two concurrent requests: each hit gave its slot
        # back at once (the router frees the miss's as its request ends).
        assert [(h.status_code, h.headers.get("x-switchyard-cache")) for h in hits] == \
            [(200, "hit")] * 3, hits[0].text
        assert hits[-1].headers["x-ratelimit-remaining"] == "0"
        refused = await http.post("/v1/chat/completions", json=body)
    assert_error(refused, 429, "rate_limit_exceeded")


TOOLS = [{"type": "function", "function": {
    "name": "search", "description": "Search the web",
    "parameters": {"type": "object", "properties": {"query": {"type": "string"}}}}}]


async def test_a_streamed_tool_call_is_stored_whole_and_replayed(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    body = ask(tools=TOOLS)
    async with sdk(gateway, tenant) as client:
        live = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        pieces = [c.choices[0].delta.tool_calls async for c in live if c.choices]
        arguments = "".join(call.function.arguments or "" for calls_ in pieces if calls_
                            for call in calls_ if call.function)
        before = await calls(fake)
        state, whole = await complete(client, {**body, "tools": TOOLS}, ON)
        assert state == "hit"
        replayed = await client.chat.completions.create(**body, stream=True, extra_headers=ON)
        deltas = [c.choices[0] async for c in replayed if c.choices]
    assert await calls(fake) == before
    (call,) = whole["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "search", "arguments": arguments}
    assert whole["choices"][0]["finish_reason"] == "tool_calls"
    (streamed,) = [tc for d in deltas for tc in d.delta.tool_calls or ()]
    assert streamed.function is not None
    assert (streamed.id, streamed.function.name, streamed.function.arguments) == (
        call["id"], "search", arguments)
    assert deltas[-1].finish_reason == "tool_calls"


async def test_an_unreadable_entry_is_a_miss_and_is_replaced(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin, r: redis.Redis) -> None:
    body = ask()
    async with sdk(gateway, tenant) as client:
        assert (await complete(client, body, ON))[0] == "miss"
        (key,) = [k async for k in r.scan_iter(match=f"{PREFIX}{tenant.id}:*")]
        await r.set(key, b"not json", ex=60)
        before = await calls(fake)
        state, answer = await complete(client, body, ON)
        assert (state, answer["metadata"]["cache_hit"]) == ("miss", False)
        assert await calls(fake) == before + 1
        assert (await complete(client, body, ON))[0] == "hit"
