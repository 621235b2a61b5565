"""The advisor reads the usage ledger and says what it sees, with the figures behind it."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import httpx

from state.advisor import recommendations
from state.usage import record_usage
from topics.messages import UsageEvent

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


def events(tenant: str, model: str, *, n: int, failures: int, cost: str, at: datetime,
           category: str | None = "summarization") -> list[UsageEvent]:
    ms = int(at.timestamp() * 1000)
    return [UsageEvent(
        event_id=str(uuid.uuid4()), request_id=f"r-{uuid.uuid4().hex}", tenant_id=tenant,
        key_id="k", provider="p", model=model, category=category,
        status="error" if i < failures else "ok", prompt_tokens=100, completion_tokens=10,
        cost_usd=Decimal(cost), latency_ms=100.0, started_at_ms=ms + i,
        finished_at_ms=ms + i + 100) for i in range(n)]


def kinds(found: list[dict[str, Any]]) -> list[str]:
    return [r["kind"] for r in found]


async def test_a_cheaper_route_with_equal_success_is_recommended(pg: asyncpg.Pool) -> None:
    tenant = f"adv-{uuid.uuid4().hex[:8]}"
    day_ago = NOW - timedelta(days=1)
    await record_usage(pg, events(tenant, "gpt-4o", n=40, failures=1, cost="0.01", at=day_ago)
                       + events(tenant, "gpt-4o-mini", n=25, failures=0, cost="0.001",
                                at=day_ago))

    found = await recommendations(pg, tenant, now=NOW)

    assert kinds(found) == ["cheaper_route"]
    figures = found[0]["figures"]
    assert (figures["current"]["model"], figures["cheaper"]["model"]) == ("gpt-4o",
                                                                          "gpt-4o-mini")
    assert figures["current"]["attempts"] == 40
    assert Decimal(figures["saving_last_7_days_usd"]) == Decimal("0.36")  # 40 × (0.01 − 0.001)


async def test_a_cheaper_route_that_fails_more_is_not_recommended(pg: asyncpg.Pool) -> None:
    tenant = f"adv-{uuid.uuid4().hex[:8]}"
    day_ago = NOW - timedelta(days=1)
    await record_usage(pg, events(tenant, "gpt-4o", n=40, failures=0, cost="0.01", at=day_ago)
                       + events(tenant, "gpt-4o-mini", n=25, failures=3, cost="0.001",
                                at=day_ago))
    assert await recommendations(pg, tenant, now=NOW) == []


async def test_a_route_whose_error_rate_rose_is_flagged(pg: asyncpg.Pool) -> None:
    tenant = f"adv-{uuid.uuid4().hex[:8]}"
    await record_usage(pg, events(tenant, "claude-haiku-4-5", n=100, failures=2, cost="0.001",
                                  at=NOW - timedelta(hours=12), category=None)
                       + events(tenant, "claude-haiku-4-5", n=30, failures=9, cost="0.001",
                                at=NOW - timedelta(minutes=20), category=None))

    found = await recommendations(pg, tenant, now=NOW)

    assert kinds(found) == ["error_rate_rose"]
    assert found[0]["figures"]["last_hour"] == {"attempts": 30, "error_rate": 0.3}
    assert found[0]["figures"]["previous_24_hours"]["error_rate"] == 0.02


async def test_spending_ahead_of_last_months_pace_is_flagged(pg: asyncpg.Pool) -> None:
    tenant = f"adv-{uuid.uuid4().hex[:8]}"
    await record_usage(pg, events(tenant, "gpt-4o", n=10, failures=0, cost="0.2",
                                  at=datetime(2026, 10, 5, tzinfo=UTC), category=None)
                       + events(tenant, "gpt-4o", n=10, failures=0, cost="1.0",
                                at=datetime(2026, 11, 5, tzinfo=UTC), category=None)
                       # after the same day last month: not part of the comparison
                       + events(tenant, "gpt-4o", n=10, failures=0, cost="5.0",
                                at=datetime(2026, 10, 28, tzinfo=UTC), category=None))

    found = await recommendations(pg, tenant, now=NOW)

    assert kinds(found) == ["spend_ahead_of_pace"]
    assert Decimal(found[0]["figures"]["month_to_date_usd"]) == Decimal("10")
    assert Decimal(found[0]["figures"]["last_month_same_days_usd"]) == Decimal("2")


async def test_the_advisor_route_answers_for_the_callers_tenant(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/advisor")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert isinstance(body["data"], list)
    async with httpx.AsyncClient(base_url=str(http.base_url)) as anonymous:
        assert (await anonymous.get("/v1/advisor")).status_code == 401
