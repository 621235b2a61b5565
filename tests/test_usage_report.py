"""GET /v1/usage and GET /v1/usage/history: a tenant's own usage over a window, exact to the
boundary (whole days from the rollup, part-days from the ledger), broken down by day, model
and provider, money exact; and migration 005, which gave the rollup its provider column.

Events are written into the ledger the way the usage worker writes them (`record_usage`), at
chosen times, for a tenant of the test's own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from state.keys import create_key, new_api_key, store_key
from state.migrations import MIGRATIONS_DIR
from state.tenancy import platform_scope
from state.usage import record_usage
from tests.test_errors import assert_openai_error
from topics.identity import Role
from topics.messages import UsageEvent


@dataclass
class Tenant:
    id: str
    http: httpx.AsyncClient


async def _new_tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    key_id, api_key = await create_key(pg, f"usage-{uuid.uuid4().hex[:12]}")
    tenant_id: str = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        yield Tenant(tenant_id, http)


@pytest.fixture
async def tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


@pytest.fixture
async def other(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def event(tenant_id: str, when: datetime, *, model: str = "gpt-4o-mini",
          provider: str = "openai", cost: str = "0.001", prompt: int = 100,
          completion: int = 10, cached: int = 0, attempt: int = 1,
          request_id: str | None = None) -> UsageEvent:
    ms = round(when.timestamp() * 1000)
    return UsageEvent(event_id=str(uuid.uuid4()), request_id=request_id or uuid.uuid4().hex,
                      tenant_id=tenant_id, key_id="k", provider=provider, model=model,
                      status="ok", prompt_tokens=prompt, completion_tokens=completion,
                      cached_tokens=cached, cost_usd=Decimal(cost), latency_ms=10.0,
                      attempt=attempt, started_at_ms=ms, finished_at_ms=ms + 10)


async def get(tenant: Tenant, path: str, **params: str) -> dict[str, Any]:
    response = await tenant.http.get(path, params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


# Three days in March 2024, with events on the boundaries a window is cut at.
MARCH = [
    ("2024-03-01T09:00:00", "gpt-4o-mini", "openai", "0.0010000000"),
    ("2024-03-01T12:00:00", "gpt-4o-mini", "openai", "0.0020000000"),  # = a window's start
    ("2024-03-02T00:00:00", "claude-haiku-4-5", "anthropic", "0.0300000000"),  # midnight
    ("2024-03-02T13:00:00", "minimax-m2", "minimax", "0.0000000001"),
    ("2024-03-02T14:00:00", "minimax-m2", "local-fallback", "0.0000000002"),
    ("2024-03-02T23:59:59.999", "gpt-4o-mini", "openai", "0.4000000000"),
    ("2024-03-03T05:59:59", "gpt-4o-mini", "openai", "5"),
    ("2024-03-03T06:00:00", "gpt-4o-mini", "openai", "60"),  # = the window's end: outside
]


async def test_a_custom_window_is_exact_at_its_boundaries(tenant: Tenant, other: Tenant,
                                                          pg: asyncpg.Pool) -> None:
    await record_usage(pg, [event(tenant.id, at(t), model=m, provider=p, cost=c)
                            for t, m, p, c in MARCH])
    # A retry of the 09:00 request: billed, but not a second request. Another tenant's
    # usage inside the window: not ours.
    await record_usage(pg, [
        event(tenant.id, at("2024-03-02T23:00:00"), attempt=2, cost="0.0000000003"),
        event(other.id, at("2024-03-02T10:00:00"), cost="1000")])

    window = {"start": "2024-03-01T12:00:00Z", "end": "2024-03-03T06:00:00Z"}
    totals = await get(tenant, "/v1/usage", **window)
    assert (totals["period"], totals["start"], totals["end"]) == (
        "custom", "2024-03-01T12:00:00Z", "2024-03-03T06:00:00Z")
    # 12:00 (inclusive) through 05:59:59 of the 3rd; not 09:00 of the 1st, not 06:00.
    expected = Decimal("5.4320000006")
    assert totals["total_cost_usd_exact"] == str(expected)
    assert totals["total_cost_usd"] == float(expected)
    assert (totals["total_requests"], totals["total_attempts"]) == (6, 7)
    assert totals["total_tokens"] == 7 * 110
    assert (totals["prompt_tokens"], totals["completion_tokens"]) == (700, 70)

    history = await get(tenant, "/v1/usage/history", **window)
    assert history["period"] == "custom"
    days = history["entries"]
    assert [d["date"] for d in days] == ["2024-03-01", "2024-03-02", "2024-03-03"]
    assert [d["cost_usd_exact"] for d in days] == ["0.002", "0.4300000006", "5"]
    assert sum(Decimal(d["cost_usd_exact"]) for d in days) == expected
    assert sum(d["requests"] for d in days) == totals["total_requests"]
    second = days[1]
    # A model served by two providers stays two rows; most expensive first.
    assert [(m["model"], m["provider"], m["cost_usd_exact"]) for m in second["models"]] == [
        ("gpt-4o-mini", "openai", "0.4000000003"),
        ("claude-haiku-4-5", "anthropic", "0.03"),
        ("minimax-m2", "local-fallback", "0.0000000002"),
        ("minimax-m2", "minimax", "0.0000000001")]
    assert [(p["provider"], p["requests"], p["attempts"]) for p in second["providers"]] == [
        ("openai", 1, 2), ("anthropic", 1, 1), ("local-fallback", 1, 1), ("minimax", 1, 1)]


async def test_history_by_model_and_by_provider_over_dates(tenant: Tenant,
                                                           pg: asyncpg.Pool) -> None:
    await record_usage(pg, [event(tenant.id, at(t), model=m, provider=p, cost=c)
                            for t, m, p, c in MARCH])
    # Dates: `end` includes its day.
    window = {"start": "2024-03-02", "end": "2024-03-02"}
    by_model = await get(tenant, "/v1/usage/history", group_by="model", **window)
    assert by_model["group_by"] == "model"
    assert (by_model["start"], by_model["end"]) == ("2024-03-02T00:00:00Z",
                                                    "2024-03-03T00:00:00Z")
    assert [(e["model"], e["cost_usd_exact"], [p["provider"] for p in e["providers"]])
            for e in by_model["entries"]] == [
        ("gpt-4o-mini", "0.4", ["openai"]),
        ("claude-haiku-4-5", "0.03", ["anthropic"]),
        ("minimax-m2", "0.0000000003", ["local-fallback", "minimax"])]
    by_provider = await get(tenant, "/v1/usage/history", group_by="provider", **window)
    assert [(e["provider"], e["requests"], [m["model"] for m in e["models"]])
            for e in by_provider["entries"]] == [
        ("openai", 1, ["gpt-4o-mini"]), ("anthropic", 1, ["claude-haiku-4-5"]),
        ("local-fallback", 1, ["minimax-m2"]), ("minimax", 1, ["minimax-m2"])]


async def test_periods_count_back_from_now(tenant: Tenant, pg: asyncpg.Pool) -> None:
    now = datetime.now(UTC)
    await record_usage(pg, [
        event(tenant.id, now, cost="0.5"),
        event(tenant.id, now - timedelta(days=40), cost="7", model="gpt-4o")])
    today = now.date().isoformat()

    week = await get(tenant, "/v1/usage/history", period="7d")
    assert week["period"] == "7d"
    # Seven UTC calendar days, today so far the last; days without usage are zeros.
    assert len(week["entries"]) == 7
    assert week["entries"][-1]["date"] == today
    assert week["entries"][-1]["cost_usd_exact"] == "0.5"
    assert all(e["requests"] == 0 and e["cost_usd"] == 0 and e["models"] == []
               for e in week["entries"][:-1])
    assert week["start"] == f"{(now.date() - timedelta(days=6)).isoformat()}T00:00:00Z"

    assert (await get(tenant, "/v1/usage"))["period"] == "month"  # the default
    assert (await get(tenant, "/v1/usage/history"))["period"] == "7d"  # the default
    for period, cost in (("24h", "0.5"), ("30d", "0.5"), ("90d", "7.5"), ("month", "0.5")):
        totals = await get(tenant, "/v1/usage", period=period)
        assert (totals["period"], totals["total_cost_usd_exact"]) == (period, cost), period


async def test_no_usage_is_zeros_not_nulls(tenant: Tenant) -> None:
    totals = await get(tenant, "/v1/usage", period="30d")
    assert (totals["total_requests"], totals["total_tokens"], totals["total_cost_usd"],
            totals["total_cost_usd_exact"]) == (0, 0, 0, "0")
    history = await get(tenant, "/v1/usage/history", period="3d")
    assert [e["requests"] for e in history["entries"]] == [0, 0, 0]


@pytest.mark.parametrize(("path", "params", "param"), [
    ("/v1/usage", {"period": "week"}, "period"),
    ("/v1/usage", {"period": "0d"}, "period"),
    ("/v1/usage", {"period": "400d"}, "period"),
    ("/v1/usage", {"start": "yesterday"}, "start"),
    ("/v1/usage", {"start": "2024-03-02", "end": "2024-03-01"}, "end"),
    ("/v1/usage", {"end": "2024-03-01"}, "end"),
    ("/v1/usage/history", {"start": "2020-01-01", "end": "2024-01-01"}, "start"),
    ("/v1/usage/history", {"group_by": "week"}, "group_by"),
])
async def test_a_bad_window_is_400_naming_the_parameter(
        tenant: Tenant, path: str, params: dict[str, str], param: str) -> None:
    response = await tenant.http.get(path, params=params)
    assert_openai_error(response, 400, "invalid_query", param)


async def test_usage_needs_an_api_key(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as anonymous:
        for path in ("/v1/usage", "/v1/usage/history"):
            assert_openai_error(await anonymous.get(path), 401, "missing_api_key")


PROVIDER_MIGRATION = MIGRATIONS_DIR / "008_usage_daily_provider.sql"


async def test_the_migration_rebuilds_the_rollup_by_provider(
        pg: asyncpg.Pool, gateway: Gateway) -> None:
    """On a database with the old rollup (no provider), the migration leaves the rollup equal
    to the ledger, split by provider."""
    name = f"rollup_{uuid.uuid4().hex[:8]}"
    await pg.execute(f'CREATE DATABASE "{name}"')
    dsn = gateway.settings.postgres.owner_dsn.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(dsn)
    try:
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.name < PROVIDER_MIGRATION.name:  # the migrations before it
                await conn.execute(path.read_text())
        await conn.execute("INSERT INTO tenants (id, name) VALUES ('t', 't')")
        for when, model, provider, cost in MARCH:
            await conn.execute(
                "INSERT INTO usage_events (event_id, request_id, tenant_id, key_id, provider,"
                " model, mode, status, prompt_tokens, completion_tokens, cached_tokens,"
                " estimated, cost_usd, latency_ms, attempt, started_at, finished_at)"
                " VALUES ($1, $2, 't', 'k', $3, $4, 'auto', 'ok', 100, 10, 0, false, $5,"
                " 1.0, 1, $6, $6)", uuid.uuid4(), uuid.uuid4().hex, provider, model,
                Decimal(cost), at(when))
        # The old rollup, one row per (tenant, day, model): both minimax-m2 providers in one.
        await conn.execute(
            "INSERT INTO usage_daily SELECT tenant_id, (started_at AT TIME ZONE 'UTC')::date,"
            " model, count(*), count(*), sum(prompt_tokens), sum(completion_tokens),"
            " sum(cached_tokens), sum(cost_usd) FROM usage_events GROUP BY 1, 2, 3")
        await conn.execute(PROVIDER_MIGRATION.read_text())
        rollup = await conn.fetch(
            "SELECT day, model, provider, requests, cost_usd FROM usage_daily"
            " WHERE day = '2024-03-02' AND model = 'minimax-m2' ORDER BY provider")
        assert [(r["provider"], r["requests"], r["cost_usd"]) for r in rollup] == [
            ("local-fallback", 1, Decimal("0.0000000002")),
            ("minimax", 1, Decimal("0.0000000001"))]
        assert await conn.fetchval("SELECT count(*) FROM usage_daily") == 6
        assert await conn.fetchval("SELECT sum(cost_usd) FROM usage_daily") == \
            await conn.fetchval("SELECT sum(cost_usd) FROM usage_events")
    finally:
        await conn.close()
        await pg.execute(f'DROP DATABASE "{name}"')


async def test_a_member_sees_its_own_keys_usage_and_an_admin_the_whole_tenants(
        pg: asyncpg.Pool, app_pg: asyncpg.Pool, gateway: Gateway, tenant: Tenant) -> None:
    """`usage:read_own`: a member key reads the usage of that key only; a key with
    `usage:read` (here the tenant's admin) reads everyone's."""
    member_id, member_key = await store_member(pg, tenant.id)
    mine = event(tenant.id, at("2024-03-01T10:00:00"), cost="0.5")
    theirs = event(tenant.id, at("2024-03-01T11:00:00"), cost="0.25")
    mine = mine.model_copy(update={"key_id": member_id})
    await record_usage(app_pg, [mine, theirs])
    window = {"start": "2024-03-01", "end": "2024-03-01"}
    whole = await get(tenant, "/v1/usage", **window)
    assert (whole["scope"], whole["total_requests"], whole["total_cost_usd"]) == \
        ("tenant", 2, 0.75)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {member_key}"}) as http:
        member = Tenant(tenant.id, http)
        own = await get(member, "/v1/usage", **window)
        assert (own["scope"], own["total_requests"], own["total_cost_usd"]) == ("key", 1, 0.5)
        history = await get(member, "/v1/usage/history", **window)
        assert history["scope"] == "key"
        assert [day["cost_usd"] for day in history["entries"]] == [0.5]


async def store_member(pg: asyncpg.Pool, tenant_id: str) -> tuple[str, str]:
    api_key = new_api_key()
    async with platform_scope(pg) as conn:
        return await store_key(conn, tenant_id, api_key, role=Role.MEMBER), api_key
