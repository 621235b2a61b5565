"""Spend budgets hold across every replica (issue 18): three ingress processes and two routers
share one count in Redis; a hard budget refuses with 402 `budget_exceeded` and its details;
a request reserves its worst case at admission and settles to its real cost; a dead
request's reservation is released after its deadline; the batch path is refused the same
way; an alert level is recorded once."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from decimal import ROUND_DOWN, Decimal
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from compose.gateway import Gateway
from state.budgets import BudgetCache, BudgetLedger, Reservation, arrival, counter_key
from state.limits import lift_limits
from state.tenancy import tenant_scope
from tests.conftest import eventually
from tests.tenancy_util import (
    Admin,
    Tenant,
    batch,
    client,
    ingress_behind_proxy,
    ingresses,
    new_tenant,
    platform,
)
from topics.budgets import Budget, to_nano
from topics.catalog import load_catalog
from topics.kafka import make_producer
from topics.messages import ReplyTarget, RequestEnvelope, UsageEvent
from topics.settings import Settings
from workers.router.budgets import BudgetAlerts, RouterBudgets

# A dear model and a long prompt: a request costs far more than the budgets' resolution (a
# millionth of a dollar). max_tokens bounds the reservation: the fake's answers are short.
CHAT = {"model": "gpt-5.5", "max_tokens": 64,
        "messages": [{"role": "user", "content": "hello " * 700}]}


@pytest.fixture(scope="module")
async def admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


@pytest.fixture(scope="module")
async def urls(gateway: Gateway,
               tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[str]]:
    # Two more ingress processes and one more router on the gateway's stack.
    async with ingresses(gateway, tmp_path_factory.mktemp("budget-replicas"), {}, {},
                         routers=1) as extra:
        yield [gateway.url, *extra]


async def ledger_cost(pg: asyncpg.Pool, tenant_id: str) -> Decimal:
    async with tenant_scope(pg, tenant_id) as conn:
        value = await conn.fetchval(
            "SELECT coalesce(sum(cost_usd), 0) FROM usage_events WHERE tenant_id = $1",
            tenant_id)
    return Decimal(value)


async def one_cost(tenant: Tenant, url: str) -> Decimal:
    async with client(url, tenant.admin_key) as http:
        response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    return Decimal(response.json()["metadata"]["cost_usd_exact"])


async def set_budget(http: httpx.AsyncClient, tenant_id: str, **body: Any) -> httpx.Response:
    return await http.post(f"/v1/tenants/{tenant_id}/budget", json=body)


async def test_200_concurrent_requests_across_replicas_stay_within_a_budget_for_50(
        admin: Admin, urls: list[str], pg: asyncpg.Pool) -> None:
    tenant = await new_tenant(admin.http, tier="growth")
    await lift_limits(pg, tenant.id)  # the budget is what refuses here, not the tier's limits
    cost = await one_cost(tenant, urls[0])  # spent before the budget: it counts too
    assert cost > 0
    # A budget's counter is seeded from the ledger (docs/budgets.md): spend still behind the
    # usage worker at that moment is not counted, so let it land first, or the alert levels
    # below, computed from the ledger, could be one request ahead of the counter's.
    await eventually(lambda: _ledger_settled(pg, tenant.id, cost), timeout_s=60)
    limit = (cost * 51).quantize(Decimal("0.000001"), rounding=ROUND_DOWN)
    response = await set_budget(admin.http, tenant.id, monthly_budget_usd=str(limit),
                                alert_threshold=0.5, hard_cap=True)
    assert response.status_code == 200, response.text

    clients = [client(url, tenant.admin_key) for url in urls]
    try:
        responses = await asyncio.gather(*(
            clients[i % len(clients)].post("/v1/chat/completions", json=CHAT)
            for i in range(200)))
    finally:
        for c in clients:
            await c.aclose()
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 402}, [r.text for r in responses if r.status_code
                                         not in (200, 402)][:3]
    served = statuses.count(200)
    assert 1 <= served <= 50
    refused = next(r for r in responses if r.status_code == 402)
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("budget_exceeded", "budget_limit_error")
    details = error["details"]
    for field in ("budget_used_usd", "budget_limit_usd", "remaining_usd"):
        assert isinstance(details[field], int | float)
        assert not isinstance(details[field], bool)
    assert Decimal(str(details["budget_limit_usd"])) == limit
    assert isinstance(details["reset_at"], str)
    assert details["reset_at"].endswith("Z")

    # The ledger: every served request billed, the budget never exceeded (the reservation is
    # each request's worst case, so not even by one request).
    spent = await eventually(lambda: _ledger_settled(pg, tenant.id, (served + 1) * cost),
                             timeout_s=60)
    assert spent <= limit

    # Each alert level the spend reached is in the audit trail once (50 % is the budget's
    # own threshold), however many routers settled requests past it.
    reached = [level for level in (50, 75, 90, 100) if spent * 100 >= limit * level]
    async with client(urls[0], tenant.admin_key) as http:
        async def alerts() -> list[int] | None:
            got = (await http.get("/v1/audit", params={"action": "budget.alert"})).json()
            levels = sorted(e["details"]["level_pct"] for e in got["entries"])
            return levels if len(levels) >= len(reached) else None
        assert await eventually(alerts, timeout_s=60) == reached


async def _ledger_settled(pg: asyncpg.Pool, tenant_id: str, expected: Decimal) -> Decimal | None:
    spent = await ledger_cost(pg, tenant_id)
    return spent if spent == expected else None


async def test_settlement_replaces_the_reservation_with_the_real_cost(
        admin: Admin, urls: list[str], r: redis.Redis) -> None:
    tenant = await new_tenant(admin.http, tier="growth")
    assert (await set_budget(admin.http, tenant.id, monthly_budget_usd="100",
                             alert_threshold=80, hard_cap=True)).status_code == 200
    cost = await one_cost(tenant, urls[1])
    budget = Budget(tenant.id, None, "month", Decimal(100), True)
    key = counter_key("s", budget, arrival(int(time.time() * 1000)))
    reserved = counter_key("r", budget, arrival(int(time.time() * 1000)))
    # Seeded from the ledger (empty) at admission, then the real cost added once settled.
    assert await eventually(lambda: _equals(r, key, to_nano(cost)))
    assert await eventually(lambda: _equals(r, reserved, 0))


async def test_usage_reports_the_budget_used_and_remaining_as_numbers(
        admin: Admin, urls: list[str], r: redis.Redis) -> None:
    tenant = await new_tenant(admin.http, tier="growth")
    async with client(urls[0], tenant.admin_key) as http:
        assert "budgets" not in (await http.get("/v1/usage")).json()  # none set yet
    assert (await set_budget(admin.http, tenant.id, monthly_budget_usd="100",
                             hard_cap=True)).status_code == 200
    cost = await one_cost(tenant, urls[1])
    budget = Budget(tenant.id, None, "month", Decimal(100), True)
    spent = counter_key("s", budget, arrival(int(time.time() * 1000)))
    await eventually(lambda: _equals(r, spent, to_nano(cost)))  # settled
    async with client(urls[0], tenant.admin_key) as http:
        usage = (await http.get("/v1/usage")).json()
    for field in ("budget_used_usd", "budget_limit_usd", "remaining_usd"):
        assert isinstance(usage[field], int | float)
        assert not isinstance(usage[field], bool)
    assert Decimal(usage["budget_used_usd_exact"]) == cost
    assert Decimal(usage["remaining_usd_exact"]) == Decimal(100) - cost
    [view] = usage["budgets"]
    assert (view["scope"], view["period"], view["hard_cap"]) == ("tenant", "month", True)
    assert view["reset_at"].endswith("Z")


async def _equals(r: redis.Redis, key: str, value: int) -> bool:
    return int(await r.get(key) or 0) == value


async def test_a_budget_set_a_moment_ago_alerts_at_once_where_a_routers_cache_lags(
        admin: Admin, gateway: Gateway, r: redis.Redis, app_pg: asyncpg.Pool,
        pg: asyncpg.Pool) -> None:
    """A router caches budgets for seconds; the ingress reads them fresh. The first request
    that reserved in a new budget must raise its alerts when it settles, even on a router
    that has not seen the budget yet: with its hard cap reached, no later request settles."""
    tenant = await new_tenant(admin.http, tier="growth")
    cache = BudgetCache(app_pg, ttl_s=3600)  # a router's, loaded before the budget existed
    assert await cache.budgets(tenant.id, "k") == []
    assert (await set_budget(admin.http, tenant.id, monthly_budget_usd="1",
                             hard_cap=True)).status_code == 200
    budget = Budget(tenant.id, None, "month", Decimal(1), True)
    ledger = BudgetLedger(r, app_pg)
    now_ms = int(time.time() * 1000)
    request_id = f"req_{uuid.uuid4().hex}"
    # What the ingress's admission does: reserve in the budget as it is now.
    assert (await ledger.reserve(Reservation(
        tenant.id, request_id, now_ms + 60_000, to_nano(Decimal("0.95")), [budget],
        arrival(now_ms)))).kind == "ok"

    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        async with aiohttp.ClientSession() as http:
            alerts = BudgetAlerts(producer, http, CollectorRegistry())
            cost = Decimal("0.92")  # 92 % of the budget: 75 and 90 % reached
            router = RouterBudgets(cache, ledger, load_catalog(Settings().catalog_path), {},
                                   lambda _: [_spent(tenant.id, request_id, cost)], alerts)
            await router.settle(RequestEnvelope(
                request_id=request_id, tenant_id=tenant.id, key_id="k",
                received_at_ms=now_ms, deadline_ms=now_ms + 60_000,
                body=CHAT, reply=ReplyTarget(channel="c"), admitted=True))
            await alerts.drain()
    finally:
        await producer.stop()

    async def levels() -> list[int] | None:
        rows = await pg.fetch("SELECT details FROM audit_events WHERE tenant_id = $1"
                              " AND action = 'budget.alert'", tenant.id)
        got = sorted(orjson.loads(row["details"])["level_pct"] for row in rows)
        return got if len(got) >= 2 else None

    assert await eventually(levels, timeout_s=30) == [75, 90]
    # And once: the alert levels are marked sent in Redis.
    assert await ledger.alerts([budget], arrival(now_ms)) == []


def _spent(tenant_id: str, request_id: str, cost: Decimal) -> UsageEvent:
    now_ms = int(time.time() * 1000)
    return UsageEvent(event_id=str(uuid.uuid4()), request_id=request_id, tenant_id=tenant_id,
                      key_id="k", provider="openai", model="gpt-5.5", status="ok",
                      cost_usd=cost, latency_ms=1.0, started_at_ms=now_ms - 1,
                      finished_at_ms=now_ms)


async def test_a_dead_requests_reservation_is_released_after_its_deadline(
        r: redis.Redis, pg: asyncpg.Pool, app_pg: asyncpg.Pool) -> None:
    tenant_id = f"t_dead_{uuid.uuid4().hex[:8]}"
    budget = Budget(tenant_id, None, "day", Decimal(1), True)
    ledger = BudgetLedger(r, app_pg)
    at = arrival(int(time.time() * 1000))
    now_ms = int(time.time() * 1000)
    await r.set(counter_key("s", budget, at), 0)  # seeded: no ledger read
    dead = Reservation(tenant_id, "dead-request", now_ms + 300, to_nano(Decimal("0.9")),
                       [budget], at)
    assert (await ledger.reserve(dead)).kind == "ok"
    late = Reservation(tenant_id, "next-request", now_ms + 60_000, to_nano(Decimal("0.5")),
                       [budget], at)
    over = await ledger.reserve(late)  # the dead one still holds its reservation
    assert over.kind == "over"
    assert over.used_nano == to_nano(Decimal("0.9"))
    await asyncio.sleep(0.4)  # past the dead request's deadline (no router will settle it)
    assert (await ledger.reserve(late)).kind == "ok"
    assert int(await r.get(counter_key("r", budget, at)) or 0) == to_nano(Decimal("0.5"))


async def test_the_batch_path_is_refused_with_the_same_402(
        admin: Admin, urls: list[str], gateway: Gateway, pg: asyncpg.Pool) -> None:
    tenant = await new_tenant(admin.http, tier="growth")
    cost = await one_cost(tenant, urls[0])
    await eventually(lambda: _ledger_settled(pg, tenant.id, cost), timeout_s=60)  # as above
    # Less than what is spent: nothing more may run.
    assert (await set_budget(admin.http, tenant.id,
                             monthly_budget_usd=str((cost / 2).quantize(Decimal("0.000001"))),
                             hard_cap=True)).status_code == 200
    async with client(urls[2], tenant.admin_key) as http:
        refused = await http.post("/v1/chat/completions", json=CHAT)
    assert refused.status_code == 402
    key_id = tenant.created["api_keys"][0]["key_id"]
    _, frame = await batch(gateway, tenant.id, key_id, CHAT)
    assert frame["kind"] == "error"
    data = frame["data"]
    assert (data["status"], data["code"], data["type"]) == (402, "budget_exceeded",
                                                            "budget_limit_error")
    assert set(data["details"]) >= {"budget_used_usd", "budget_limit_usd", "remaining_usd",
                                    "reset_at"}


async def test_only_a_budget_manager_of_the_tenant_sets_its_budget(
        admin: Admin, urls: list[str]) -> None:
    tenant = await new_tenant(admin.http, tier="growth")
    other = await new_tenant(admin.http, tier="growth")
    async with client(urls[0], tenant.admin_key) as http:
        own = await set_budget(http, tenant.id, monthly_budget_usd=25, hard_cap=False,
                               alert_threshold=0.8)
        theirs = await set_budget(http, other.id, monthly_budget_usd=25)
        listed = await http.get(f"/v1/tenants/{tenant.id}/budgets")
    assert own.status_code == 200, own.text
    assert own.json()["alert_levels"] == [75, 80, 90, 100]
    assert theirs.status_code == 404  # another tenant's: as if it did not exist
    assert theirs.json()["error"]["code"] == "tenant_not_found"
    assert [b["limit_usd"] for b in listed.json()["budgets"]] == [25]


async def test_with_redis_unreachable_a_hard_budget_fails_closed_and_a_soft_one_serves(
        gateway: Gateway, admin: Admin, pg: asyncpg.Pool,
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """An ingress whose Redis is cut: a tenant with a hard budget gets 503
    `budgets_unavailable` with Retry-After, never a hang; one whose budget is soft passes
    admission (and meets the next part that needs Redis: the reply channel)."""
    hard = await new_tenant(admin.http, tier="growth")
    soft = await new_tenant(admin.http, tier="growth")
    for tenant, cap in ((hard, True), (soft, False)):
        await lift_limits(pg, tenant.id)  # budgets alone decide here
        assert (await set_budget(admin.http, tenant.id, monthly_budget_usd="100",
                                 hard_cap=cap)).status_code == 200
    logs = tmp_path_factory.mktemp("budget-cut")
    async with ingress_behind_proxy(gateway, logs) as (url, proxy):
        async with client(url, hard.admin_key) as shut, client(url, soft.admin_key) as open_:
            for http in (shut, open_):  # keys and budgets cached while Redis is there
                assert (await http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            await proxy.cut()
            refused = await shut.post("/v1/chat/completions", json=CHAT)
            served = await open_.post("/v1/chat/completions", json=CHAT)
        assert refused.status_code == 503, refused.text
        assert refused.json()["error"]["code"] == "budgets_unavailable"
        assert int(refused.headers["retry-after"]) >= 1
        assert served.status_code == 503, served.text
        assert served.json()["error"]["code"] != "budgets_unavailable"  # admitted unchecked
