"""A tenant's usage over a window of time, by UTC day, model and provider: what GET /v1/usage
and GET /v1/usage/history (`ingress/usage.py`) answer from.

The window's whole UTC days come from the daily rollup (`usage_daily`, which `state/usage.py`
keeps equal to the ledger in the same statement that writes the ledger); the parts of days at
its edges (today so far, the first hours of a rolling window) come from the ledger
(`usage_events`, by its (tenant_id, started_at) index). So any boundary is exact, and a month
costs ~31 rollup rows per model and provider plus at most two part-days of ledger rows,
however busy the tenant. The rollup has the provider (migration 005): a model is not always
served by its catalog provider (the offline fallback), so the provider breakdown cannot be
inferred from the model.

Counting as the rollup does: `requests` are first attempts, `attempts` every call that
reached a provider, tokens and cost those of every attempt (what the tenant is billed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal

import asyncpg

from state.tenancy import tenant_scope


@dataclass(frozen=True, slots=True)
class Window:
    """[start, end): two aware datetimes, start before end."""

    start: datetime
    end: datetime

    def days(self) -> list[date]:
        """The UTC days the window touches, in order."""
        first = self.start.astimezone(UTC).date()
        last = (self.end.astimezone(UTC) - timedelta(microseconds=1)).date()
        return [first + timedelta(days=n) for n in range((last - first).days + 1)]


@dataclass(frozen=True, slots=True)
class UsageRow:
    """One UTC day's usage of one model through one provider, within the window."""

    day: date
    model: str
    provider: str
    requests: int
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: Decimal


@dataclass(slots=True)
class Counts:
    """Sums of rows; money stays Decimal."""

    requests: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: Decimal = field(default_factory=Decimal)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens  # cached tokens are prompt tokens

    def add(self, row: UsageRow) -> None:
        self.requests += row.requests
        self.attempts += row.attempts
        self.prompt_tokens += row.prompt_tokens
        self.completion_tokens += row.completion_tokens
        self.cached_tokens += row.cached_tokens
        self.cost_usd += row.cost_usd


_ROWS = """
SELECT day, model, provider, requests, attempts, prompt_tokens, completion_tokens,
       cached_tokens, cost_usd
FROM usage_daily
WHERE tenant_id = $1 AND day >= $2 AND day < $3
UNION ALL
SELECT (started_at AT TIME ZONE 'UTC')::date, model, provider,
       count(*) FILTER (WHERE attempt = 1), count(*), sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), sum(cost_usd)
FROM usage_events
WHERE tenant_id = $1
  AND (started_at >= $4 AND started_at < $5 OR started_at >= $6 AND started_at < $7)
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
"""


# One key's usage (a member reads its own): the rollup has no key, so the ledger answers for
# the whole window, through the tenant's (tenant_id, started_at) index.
_KEY_ROWS = """
SELECT (started_at AT TIME ZONE 'UTC')::date AS day, model, provider,
       count(*) FILTER (WHERE attempt = 1) AS requests, count(*) AS attempts,
       sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
       sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd
FROM usage_events
WHERE tenant_id = $1 AND key_id = $2 AND started_at >= $3 AND started_at < $4
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
"""


def _midnight(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def split(window: Window) -> tuple[tuple[date, date], tuple[datetime, datetime],
                                   tuple[datetime, datetime]]:
    """The window as whole UTC days [first, last) for the rollup, and the part-days before
    and after them, each [from, to), for the ledger (empty ranges have from == to)."""
    start, end = window.start.astimezone(UTC), window.end.astimezone(UTC)
    first = start.date() if start == _midnight(start.date()) else start.date() + timedelta(1)
    last = end.date()
    if first >= last:  # no whole day inside: the ledger answers for all of it
        return (first, first), (start, end), (end, end)
    return (first, last), (start, _midnight(first)), (_midnight(last), end)


async def usage_rows(pool: asyncpg.Pool, tenant_id: str, window: Window,
                     key_id: str | None = None) -> list[UsageRow]:
    """The tenant's usage in `window` by (UTC day, model, provider), in that order; only
    the key `key_id`'s when given."""
    async with tenant_scope(pool, tenant_id) as conn:
        if key_id is not None:
            rows = await conn.fetch(_KEY_ROWS, tenant_id, key_id, window.start, window.end)
        else:
            (first, last), before, after = split(window)
            rows = await conn.fetch(_ROWS, tenant_id, first, last, *before, *after)
    return [UsageRow(day=r["day"], model=r["model"], provider=r["provider"],
                     requests=r["requests"], attempts=r["attempts"],
                     prompt_tokens=r["prompt_tokens"], completion_tokens=r["completion_tokens"],
                     cached_tokens=r["cached_tokens"], cost_usd=r["cost_usd"])
            for r in rows]
