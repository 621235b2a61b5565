"""Rate limits that hold across every replica: two ingress processes and two routers share
one count in Redis (one atomic script per request), tokens reserved at admission are settled
from the provider's reported usage, a dead request's concurrency slot comes back at its
deadline, the batch path is refused as the HTTP path is, and every response says where the
caller stands (`x-ratelimit-*`, `X-RateLimit-*`). docs/limits.md."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from compose.gateway import Gateway
from state.limits import LimitTicket, reservation_key, run_tickets
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import (
    CHAT,
    Admin,
    Tenant,
    batch,
    client,
    ingress_behind_proxy,
    ingresses,
    new_key,
    new_tenant,
    platform,
)
from topics.limits import LimitPolicy, Limits

OPENAI_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                  "x-ratelimit-reset-requests", "x-ratelimit-limit-tokens",
                  "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens")
SEED_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.fixture(scope="module")
async def platform_admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


@pytest.fixture(scope="module")
async def replicas(gateway: Gateway,
                   tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[str]]:
    """The gateway's ingress and router plus one more of each: two of both. Yields the two
    ingresses' URLs."""
    async with ingresses(gateway, tmp_path_factory.mktemp("replicas"), {},
                         routers=1) as [url]:
        yield [gateway.url, url]


@pytest.fixture
async def tenant(platform_admin: Admin) -> Tenant:
    return await new_tenant(platform_admin.http, tier="growth")


async def set_limits(admin: Admin, tenant_id: str, **limits: Any) -> dict[str, Any]:
    response = await admin.http.put(f"/v1/tenants/{tenant_id}/limits", json=limits)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_a_limit_of_n_per_minute_admits_exactly_n_across_two_ingresses(
        tenant: Tenant, platform_admin: Admin, replicas: list[str]) -> None:
    await set_limits(platform_admin, tenant.id, requests_per_minute=12)
    clients = [client(url, tenant.admin_key) for url in replicas]
    try:
        for c in clients:  # each ingress has the key cached: both race from the start
            assert (await c.get("/v1/models")).status_code == 200
        responses = await asyncio.gather(*(
            clients[i % 2].post("/v1/chat/completions", json=CHAT) for i in range(40)))
    finally:
        for c in clients:
            await c.aclose()
    statuses = [r.status_code for r in responses]
    assert statuses.count(200) == 12, statuses
    assert statuses.count(429) == 28, statuses
    refused = next(r for r in responses if r.status_code == 429)
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "rate_limit_error", "rate_limit_exceeded", "requests_per_minute")
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    # Twenty to each ingress: counted per replica, each would have admitted twelve.


async def test_every_response_carries_the_rate_limit_headers_streams_included(
        tenant: Tenant, platform_admin: Admin) -> None:
    await set_limits(platform_admin, tenant.id, requests_per_minute=100,
                     tokens_per_minute=50_000)
    async with client(platform_admin.http.base_url.__str__(), tenant.admin_key) as http:
        first = await http.post("/v1/chat/completions", json=CHAT)
        second = await http.post("/v1/chat/completions", json={**CHAT, "stream": True})
        invalid = await http.post("/v1/chat/completions", json={**CHAT, "max_tokens": -1})
    for response in (first, second):
        assert response.status_code == 200, response.text
        for name in (*OPENAI_HEADERS, *SEED_HEADERS):
            assert name in response.headers, (name, response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == "100"
        assert response.headers["x-ratelimit-limit"] == "100"
        assert response.headers["x-ratelimit-limit-tokens"] == "50000"
        assert abs(int(response.headers["x-ratelimit-reset"]) - time.time()) <= 61
        assert response.headers["x-ratelimit-reset-requests"].endswith("s")
    assert second.headers["content-type"].startswith("text/event-stream")
    assert int(first.headers["x-ratelimit-remaining-requests"]) == 99
    assert int(second.headers["x-ratelimit-remaining-requests"]) == 98
    assert first.headers["x-ratelimit-remaining"] == first.headers[
        "x-ratelimit-remaining-requests"]
    assert invalid.status_code == 422 or invalid.status_code == 400  # refused before admission


async def test_tokens_per_minute_reserve_the_estimate_and_settle_to_the_real_usage(
        tenant: Tenant, platform_admin: Admin, fake: FakeAdmin, r: redis.Redis) -> None:
    await set_limits(platform_admin, tenant.id, tokens_per_minute=10_000)
    await fake.configure(tokens=5, prompt_tokens_override=7)  # 12 tokens really used
    body = {**CHAT, "max_tokens": 4000}  # reserves 4000 + the prompt's estimate
    async with client(platform_admin.http.base_url.__str__(), tenant.admin_key) as http:
        first = await http.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text
        reserved = 10_000 - int(first.headers["x-ratelimit-remaining-tokens"])
        assert 4000 < reserved < 4100

        async def settled() -> bool:
            return not await r.exists(reservation_key(first.headers["x-request-id"]))

        await eventually(settled)
        second = await http.post("/v1/chat/completions", json=body)
    remaining = int(second.headers["x-ratelimit-remaining-tokens"])
    # The first request's reservation came back but for the 12 tokens it used; unsettled,
    # only its refill (167 tokens a second) would have.
    assert 10_000 - reserved - 12 - 1 <= remaining <= 10_000 - reserved, remaining


async def test_a_dead_requests_concurrency_slot_is_released_after_its_deadline(
        tenant: Tenant, platform_admin: Admin, r: redis.Redis) -> None:
    await set_limits(platform_admin, tenant.id, concurrent_requests=1)
    # A request admitted by a process that then died: nobody will ever settle it.
    dead = LimitTicket(tenant_id=tenant.id, key_id="k_dead", request_id="req_dead",
                       deadline_ms=int(time.time() * 1000) + 1500, tokens=10,
                       limits=Limits(LimitPolicy(concurrent_requests=1), LimitPolicy()))
    (result,) = await run_tickets(r, [dead])
    assert dead.parse(result).admitted
    async with client(platform_admin.http.base_url.__str__(), tenant.admin_key) as http:
        refused = await http.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["param"] == "concurrent_requests"

        answers: list[httpx.Response] = []

        async def served() -> bool:
            answers.append(await http.post("/v1/chat/completions", json=CHAT))
            return answers[-1].status_code == 200

        await eventually(served)

        # A served request frees its slot when it ends (the router settles it, moments after
        # the answer): the next one is admitted too.
        async def slot_free() -> bool:
            return not await r.exists(reservation_key(answers[-1].headers["x-request-id"]))

        await eventually(slot_free)
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200


async def test_the_batch_path_is_refused_as_the_http_path_is(
        tenant: Tenant, platform_admin: Admin, gateway: Gateway, fake: FakeAdmin,
        replicas: list[str]) -> None:
    async with client(gateway.url, tenant.admin_key) as owner:
        key = await new_key(owner, tenant.id)
    await set_limits(platform_admin, tenant.id, key_id=key["key_id"], requests_per_minute=2)
    async with client(gateway.url, key["key"]) as http:
        assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
    _, served = await batch(gateway, tenant.id, key["key_id"])
    assert served["kind"] == "done", served  # the second of two
    request_id, refused = await batch(gateway, tenant.id, key["key_id"])
    assert refused["kind"] == "error", refused
    data = refused["data"]
    assert (data["status"], data["type"], data["code"], data["param"]) == (
        429, "rate_limit_error", "rate_limit_exceeded", "requests_per_minute")
    assert data["retry_after_s"] > 0
    # Saying it was admitted by an ingress does not make it so.
    _, forged = await batch(gateway, tenant.id, key["key_id"], admitted=True)
    assert (forged["kind"], forged["data"]["code"]) == ("error", "rate_limit_exceeded")
    assert request_id not in (await fake.stats())["calls_by_request_id"]
    async with client(gateway.url, key["key"]) as http:
        again = await http.post("/v1/chat/completions", json=CHAT)
    assert again.status_code == 429
    error = again.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        data["type"], data["code"], data["param"])


async def test_limits_are_read_and_changed_through_the_admin_api_and_audited(
        tenant: Tenant, platform_admin: Admin) -> None:
    async with client(platform_admin.http.base_url.__str__(), tenant.admin_key) as owner:
        shown = (await owner.get(f"/v1/tenants/{tenant.id}/limits")).json()
        assert shown["tier"] == "growth"
        assert shown["limits"]["requests_per_minute"] == 1500
        assert shown["fail_open"] is True
        lowered = await owner.put(f"/v1/tenants/{tenant.id}/limits",
                                  json={"requests_per_minute": 600})
        assert lowered.status_code == 200, lowered.text
        assert lowered.json()["limits"]["requests_per_minute"] == 600
        above = await owner.put(f"/v1/tenants/{tenant.id}/limits",
                                json={"requests_per_minute": 100_000})
        assert (above.status_code, above.json()["error"]["code"]) == (403, "limit_above_tier")
        other = await owner.get(f"/v1/tenants/{platform_admin.tenant_id}/limits")
        assert other.status_code == 404
        audit = (await owner.get("/v1/audit", params={"action": "limits.updated"})).json()

    async def audited() -> bool:
        async with client(platform_admin.http.base_url.__str__(), tenant.admin_key) as owner:
            got = (await owner.get("/v1/audit", params={"action": "limits.updated"})).json()
        return len(got["entries"]) >= 1

    assert audit is not None
    await eventually(audited)
    raised = await set_limits(platform_admin, tenant.id, requests_per_minute=100_000,
                              fail_open=False)
    assert raised["limits"]["requests_per_minute"] == 100_000
    assert raised["fail_open"] is False



async def test_with_redis_unreachable_admission_fails_open_or_closed_as_the_tenant_says(
        gateway: Gateway, platform_admin: Admin,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """An ingress whose Redis is cut: a fail-closed tenant gets 503 `limits_unavailable`
    with Retry-After; a fail-open one passes admission (and meets the next part that needs
    Redis: the reply channel). Neither waits past `redis.socket_timeout_s`."""
    closed = await new_tenant(platform_admin.http, tier="growth")
    opened = await new_tenant(platform_admin.http, tier="growth")
    await set_limits(platform_admin, closed.id, fail_open=False)
    logs = tmp_path_factory.mktemp("cut")
    async with ingress_behind_proxy(gateway, logs) as (url, proxy):
        async with client(url, closed.admin_key) as shut, client(url, opened.admin_key) as op:
            for http in (shut, op):  # keys and limits cached while Redis is there
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await proxy.cut()
            refused = await shut.post("/v1/chat/completions", json=CHAT)
            served = await op.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "limits_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert served.status_code == 503, served.text
        assert served.json()["error"]["code"] != "limits_unavailable"  # admitted: fail-open
