"""Recommendations computed from the usage ledger, each with the figures behind it:

- `cheaper_route`: a category whose traffic could move to a cheaper route at equal success;
- `error_rate_rose`: a route whose error rate in the last hour is well above its day's;
- `spend_ahead_of_pace`: a tenant whose month-to-date spend runs ahead of last month's.

Thresholds are arguments (with defaults) so operators can tune them; every recommendation
says which figures crossed which threshold."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from state.tenancy import Connection, tenant_scope


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_attempts: int = 20  # below this, a success or error rate says little
    success_margin: float = 0.02  # "equal success": within two points
    error_rate_floor: float = 0.05
    error_rate_factor: float = 2.0
    pace_factor: float = 1.5
    min_spend_usd: Decimal = Decimal("1")


_ROUTES_BY_CATEGORY = """
SELECT category, model, count(*) AS attempts,
       avg((status = 'ok')::int)::float8 AS success_rate,
       sum(cost_usd) / count(*) AS cost_per_attempt
FROM usage_events
WHERE tenant_id = $1 AND category IS NOT NULL AND started_at >= $2
GROUP BY category, model
"""

_ERROR_RATES = """
SELECT model,
       count(*) FILTER (WHERE started_at >= $2) AS recent_attempts,
       avg((status <> 'ok')::int) FILTER (WHERE started_at >= $2)::float8 AS recent_rate,
       count(*) FILTER (WHERE started_at < $2) AS baseline_attempts,
       avg((status <> 'ok')::int) FILTER (WHERE started_at < $2)::float8 AS baseline_rate
FROM usage_events
WHERE tenant_id = $1 AND started_at >= $3 AND NOT cache_hit  -- no provider was called
GROUP BY model
"""

_SPEND = """
SELECT coalesce(sum(cost_usd) FILTER (WHERE day >= $2), 0) AS month_to_date,
       coalesce(sum(cost_usd) FILTER (WHERE day >= $3 AND day < $4), 0) AS last_month_same_days
FROM usage_daily WHERE tenant_id = $1 AND day >= $3
"""


async def recommendations(pool: asyncpg.Pool, tenant_id: str, *, now: datetime | None = None,
                          thresholds: Thresholds = Thresholds()) -> list[dict[str, Any]]:
    now = now or datetime.now(UTC)
    async with tenant_scope(pool, tenant_id) as conn:
        found = await _cheaper_routes(conn, tenant_id, now, thresholds)
        found += await _error_rates(conn, tenant_id, now, thresholds)
        found += await _pace(conn, tenant_id, now, thresholds)
    return found


async def _cheaper_routes(conn: Connection, tenant_id: str, now: datetime,
                          t: Thresholds) -> list[dict[str, Any]]:
    rows = await conn.fetch(_ROUTES_BY_CATEGORY, tenant_id, now - timedelta(days=7))
    by_category: dict[str, list[asyncpg.Record]] = {}
    for row in rows:
        if row["attempts"] >= t.min_attempts:
            by_category.setdefault(row["category"], []).append(row)
    found = []
    for category, routes in sorted(by_category.items()):
        busiest = max(routes, key=lambda r: r["attempts"])
        cheaper = [r for r in routes if r["cost_per_attempt"] < busiest["cost_per_attempt"]
                   and r["success_rate"] >= busiest["success_rate"] - t.success_margin]
        if not cheaper:
            continue
        best = min(cheaper, key=lambda r: r["cost_per_attempt"])
        saving = (busiest["cost_per_attempt"] - best["cost_per_attempt"]) * busiest["attempts"]
        found.append({
            "kind": "cheaper_route", "category": category,
            "message": f"{category}: {best['model']} matched {busiest['model']}'s success at "
                       f"a lower cost per attempt over the last 7 days",
            "figures": {"current": _route_figures(busiest), "cheaper": _route_figures(best),
                        "saving_last_7_days_usd": str(saving.quantize(Decimal("0.000001")))}})
    return found


def _route_figures(row: asyncpg.Record) -> dict[str, Any]:
    return {"model": row["model"], "attempts": row["attempts"],
            "success_rate": round(row["success_rate"], 4),
            "cost_per_attempt_usd": str(row["cost_per_attempt"].quantize(Decimal("1e-8")))}


async def _error_rates(conn: Connection, tenant_id: str, now: datetime,
                       t: Thresholds) -> list[dict[str, Any]]:
    rows = await conn.fetch(_ERROR_RATES, tenant_id, now - timedelta(hours=1),
                            now - timedelta(hours=25))
    found = []
    for row in rows:
        recent, baseline = row["recent_rate"] or 0.0, row["baseline_rate"] or 0.0
        if (row["recent_attempts"] >= t.min_attempts and recent >= t.error_rate_floor
                and recent >= t.error_rate_factor * baseline):
            found.append({
                "kind": "error_rate_rose", "model": row["model"],
                "message": f"{row['model']} failed {recent:.0%} of attempts in the last hour, "
                           f"against {baseline:.0%} over the day before",
                "figures": {"last_hour": {"attempts": row["recent_attempts"],
                                          "error_rate": round(recent, 4)},
                            "previous_24_hours": {"attempts": row["baseline_attempts"],
                                                  "error_rate": round(baseline, 4)}}})
    return found


async def _pace(conn: Connection, tenant_id: str, now: datetime,
                t: Thresholds) -> list[dict[str, Any]]:
    today = now.date()
    month_start = today.replace(day=1)
    last_month_start = (month_start - timedelta(days=1)).replace(day=1)
    # The same number of days into last month (clamped to its length).
    same_day_last_month = min(last_month_start + timedelta(days=today.day), month_start)
    row = await conn.fetchrow(_SPEND, tenant_id, month_start, last_month_start,
                              same_day_last_month)
    assert row is not None
    current, previous = row["month_to_date"], row["last_month_same_days"]
    if current < t.min_spend_usd or current < previous * Decimal(str(t.pace_factor)):
        return []
    return [{
        "kind": "spend_ahead_of_pace",
        "message": f"spent ${current:.2f} this month so far, against ${previous:.2f} by the "
                   "same day last month",
        "figures": {"month_to_date_usd": str(current), "last_month_same_days_usd": str(previous),
                    "days_into_month": today.day}}]
