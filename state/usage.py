"""The usage ledger: one row per attempt, written once, with its daily rollup (per tenant,
UTC day, model and provider).

The other files of the feature: `topics/messages.py` (`UsageEvent`, the `llm.usage` message,
published as topics/schemas/usage.v1.json) is what the router emits per attempt;
`workers/usage/` consumes it into this ledger; `state/advisor.py` reads the ledger;
`state/usage_report.py` reads ledger and rollup for GET /v1/usage and /v1/usage/history.

Row-level security (state/tenancy.py) binds the writer too: a batch holds many tenants' events,
so each tenant's share is written under that tenant, all in one transaction."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg

from state.tenancy import act_for, tenant_scope
from topics.messages import UsageEvent

_COLUMNS = (
    "event_id", "request_id", "tenant_id", "key_id", "provider", "model", "category", "mode",
    "status", "error_code", "prompt_tokens", "completion_tokens", "cached_tokens", "estimated",
    "cost_usd", "latency_ms", "ttft_ms", "attempt", "started_at", "finished_at", "cache_hit",
)
_TYPES = (
    "uuid", "text", "text", "text", "text", "text", "text", "text", "text", "text", "int4",
    "int4", "int4", "bool", "numeric", "float8", "float8", "int4", "timestamptz", "timestamptz",
    "bool",
)

# One statement: the rollup is fed only by the rows this statement really inserted, so a
# replayed event changes neither the ledger nor the rollup, and the two always agree.
_INSERT = f"""
WITH incoming AS (
    SELECT * FROM unnest({", ".join(f"${i}::{t}[]" for i, t in enumerate(_TYPES, 1))})
        AS r({", ".join(_COLUMNS)})
), inserted AS (
    INSERT INTO usage_events ({", ".join(_COLUMNS)})
    SELECT {", ".join(_COLUMNS)} FROM incoming
    ON CONFLICT (event_id) DO NOTHING
    RETURNING tenant_id, (started_at AT TIME ZONE 'UTC')::date AS day, model, provider,
              attempt, prompt_tokens, completion_tokens, cached_tokens, cost_usd
)
INSERT INTO usage_daily AS d (tenant_id, day, model, provider, requests, attempts,
                              prompt_tokens, completion_tokens, cached_tokens, cost_usd)
SELECT tenant_id, day, model, provider, count(*) FILTER (WHERE attempt = 1), count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(cost_usd)
FROM inserted GROUP BY tenant_id, day, model, provider
ON CONFLICT (tenant_id, day, model, provider) DO UPDATE SET
    requests = d.requests + EXCLUDED.requests,
    attempts = d.attempts + EXCLUDED.attempts,
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    cached_tokens = d.cached_tokens + EXCLUDED.cached_tokens,
    cost_usd = d.cost_usd + EXCLUDED.cost_usd
"""


def _ts(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


async def record_usage(pool: asyncpg.Pool, events: Sequence[UsageEvent]) -> None:
    """Write the events that are not yet in the ledger and fold them into the rollup.

    One transaction for the whole batch, so it is recorded entirely or not at all (the worker
    commits offsets only after it); inside it, one statement per tenant, each acting for its
    tenant. A batch is mostly one or a few tenants: two round trips each."""
    by_tenant: dict[str, list[list[object]]] = {}
    for e in {e.event_id: e for e in events}.values():
        columns = by_tenant.get(e.tenant_id)
        if columns is None:
            columns = by_tenant[e.tenant_id] = [[] for _ in _COLUMNS]
        row = (
            e.event_id, e.request_id, e.tenant_id, e.key_id, e.provider, e.model, e.category,
            e.mode, e.status, e.error_code, e.prompt_tokens, e.completion_tokens,
            e.cached_tokens, e.estimated, e.cost_usd, e.latency_ms, e.ttft_ms, e.attempt,
            _ts(e.started_at_ms), _ts(e.finished_at_ms), e.cache_hit,
        )
        for column, value in zip(columns, row, strict=True):
            column.append(value)
    if not by_tenant:
        return
    async with pool.acquire() as conn, conn.transaction():
        for tenant_id, columns in by_tenant.items():
            await act_for(conn, tenant_id)
            await conn.execute(_INSERT, *columns)


async def answered_request(pool: asyncpg.Pool, tenant_id: str,
                           request_id: str) -> asyncpg.Record | None:
    """The model and category that answered the tenant's request `request_id` (its last
    successful attempt), or None: unknown, another tenant's, or not answered (yet)."""
    async with tenant_scope(pool, tenant_id) as conn:
        row: asyncpg.Record | None = await conn.fetchrow(
            "SELECT model, category FROM usage_events WHERE request_id = $1 AND tenant_id = $2"
            " AND status = 'ok' ORDER BY finished_at DESC LIMIT 1",
            request_id, tenant_id)
    return row
