"""The audit trail in PostgreSQL: each tenant's append-only hash chain (`audit_events`, its
head in `audit_chain_heads`; state/migrations/006_audit.sql), written once per event, read
back page by page, and verified.

The other files of the feature: `topics/audit.py` is the event (`AuditEvent`) and the row
hash; `ingress/audit.py` publishes events and serves GET /v1/audit; `workers/audit/` consumes
`audit.events` into `append_event`; `compose/cli.py` runs `verify_chain` (`switchyard audit
verify`). Every query runs in `tenant_scope` (state/tenancy.py): row-level security reads it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from state.tenancy import Connection, platform_scope, tenant_scope
from topics.audit import GENESIS_HASH, AuditEvent, ChainRow, canonical_details, row_hash

_ROW_COLUMNS = ("event_id, tenant_id, seq, occurred_at, recorded_at, actor, actor_role, action,"
                " target, details, request_id, trace_id, source_ip, prev_hash")
_INSERT = (f"INSERT INTO audit_events ({_ROW_COLUMNS}, hash)"
           " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10::json, $11, $12, $13, $14, $15)"
           " ON CONFLICT (event_id) DO NOTHING RETURNING seq")
# Every writer of a tenant's chain takes this lock first (per transaction), so two writers,
# in one process or several, never both append after the same head. The text prefix keeps
# these locks apart from any other advisory lock on a tenant's name.
_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('audit:' || $1, 0))"


async def append_event(pool: asyncpg.Pool, event: AuditEvent) -> bool:
    """Append `event` to its tenant's chain, unless an event with its id is already recorded
    (a redelivery). Returns whether a row was added."""
    tenant = event.tenant_id
    async with tenant_scope(pool, tenant) as conn:
        await conn.execute(_LOCK, tenant)
        head = await conn.fetchrow(
            "SELECT seq, hash FROM audit_chain_heads WHERE tenant_id = $1 FOR UPDATE", tenant)
        seq, prev = (head["seq"] + 1, head["hash"]) if head else (1, GENESIS_HASH)
        row = ChainRow(
            event_id=str(event.event_id), tenant_id=tenant, seq=seq,
            occurred_at=event.occurred_at, recorded_at=datetime.now(UTC), actor=event.actor,
            actor_role=event.actor_role, action=event.action, target=event.target,
            details=canonical_details(event.details), request_id=event.request_id,
            trace_id=event.trace_id, source_ip=event.source_ip, prev_hash=prev)
        digest = row_hash(row)
        inserted = await conn.fetchval(
            _INSERT, event.event_id, tenant, seq, row.occurred_at, row.recorded_at, row.actor,
            row.actor_role, row.action, row.target, row.details, row.request_id, row.trace_id,
            row.source_ip, prev, digest)
        if inserted is None:
            return False  # recorded before: the chain stays as it is
        await conn.execute(
            "INSERT INTO audit_chain_heads (tenant_id, seq, hash) VALUES ($1, $2, $3)"
            " ON CONFLICT (tenant_id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash,"
            " updated_at = now()",
            tenant, seq, digest)
        return True


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A page of one tenant's trail, newest first. `before_seq`: the page after the one that
    ended just above this row (the cursor)."""

    tenant_id: str
    limit: int
    action: str | None = None
    actor: str | None = None
    since: datetime | None = None  # occurred at or after
    until: datetime | None = None  # occurred before
    before_seq: int | None = None


@dataclass(frozen=True, slots=True)
class AuditPage:
    rows: list[asyncpg.Record]  # the columns of ChainRow, plus `hash`
    has_more: bool


async def list_entries(pool: asyncpg.Pool, query: AuditQuery) -> AuditPage:
    conditions = ["tenant_id = $1"]
    args: list[object] = [query.tenant_id]
    for column, op, value in (("action", "=", query.action), ("actor", "=", query.actor),
                              ("occurred_at", ">=", query.since),
                              ("occurred_at", "<", query.until),
                              ("seq", "<", query.before_seq)):
        if value is not None:
            args.append(value)
            conditions.append(f"{column} {op} ${len(args)}")
    args.append(query.limit + 1)  # one more than asked: whether there is a next page
    sql = (f"SELECT {_ROW_COLUMNS}, hash FROM audit_events WHERE {' AND '.join(conditions)}"
           f" ORDER BY seq DESC LIMIT ${len(args)}")
    async with tenant_scope(pool, query.tenant_id) as conn:
        rows = await conn.fetch(sql, *args)
    return AuditPage(rows[:query.limit], len(rows) > query.limit)


@dataclass(frozen=True, slots=True)
class ChainReport:
    """What `verify_chain` found. `problem` is None when the chain holds."""

    tenant_id: str
    rows: int
    head_hash: str | None  # the last row's hash: keep it elsewhere to notice a rewrite later
    problem: str | None = None
    broken_seq: int | None = None
    broken_event_id: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _chain_row(record: asyncpg.Record) -> ChainRow:
    fields: dict[str, Any] = dict(record.items())
    del fields["hash"]
    fields["event_id"] = str(fields["event_id"])  # asyncpg gives uuid.UUID
    return ChainRow(**fields)


async def _rows(conn: Connection,
                tenant_id: str) -> AsyncIterator[asyncpg.Record]:
    async for record in conn.cursor(
            f"SELECT {_ROW_COLUMNS}, hash FROM audit_events WHERE tenant_id = $1 ORDER BY seq",
            tenant_id, prefetch=500):
        yield record


async def verify_chain(pool: asyncpg.Pool, tenant_id: str) -> ChainReport:
    """Recompute the tenant's chain from its first row; the first row that does not fit is
    reported (altered, missing, out of place), then whether the newest rows are all there."""
    expected, prev, count = 1, GENESIS_HASH, 0
    async with tenant_scope(pool, tenant_id) as conn:
        async for record in _rows(conn, tenant_id):
            row, stored = _chain_row(record), record["hash"]
            if row.seq != expected:
                return ChainReport(tenant_id, count, None,
                                   f"row {expected} is missing: the row after row "
                                   f"{expected - 1} is row {row.seq} (event {row.event_id})",
                                   broken_seq=expected)
            problem = None
            if row.prev_hash != prev:
                problem = (f"row {row.seq} does not follow row {row.seq - 1}: its prev_hash is "
                           f"not that row's hash (one of the two was changed)")
            elif row_hash(row) != stored:
                problem = f"row {row.seq} was altered: its contents no longer match its hash"
            if problem is not None:
                return ChainReport(tenant_id, count, None, problem, row.seq, row.event_id)
            expected, prev, count = expected + 1, stored, count + 1
        head = await conn.fetchrow(
            "SELECT seq, hash FROM audit_chain_heads WHERE tenant_id = $1", tenant_id)
    last = expected - 1
    if head is None and count:
        return ChainReport(tenant_id, count, prev, "the chain has rows but no head",
                           broken_seq=last)
    if head is not None and (head["seq"], head["hash"]) != (last, prev):
        return ChainReport(tenant_id, count, prev,
                           f"the chain ends at row {last}, but its head says row {head['seq']}: "
                           f"newer rows were removed (or the head changed)",
                           broken_seq=last + 1)
    return ChainReport(tenant_id, count, prev if count else None)


async def chained_tenants(pool: asyncpg.Pool) -> list[str]:
    """Every tenant with an audit chain: for the database owner (`switchyard audit verify`),
    in a platform scope. Under the application role the scope sees no row, so this refuses
    rather than answer an empty list."""
    async with platform_scope(pool) as conn:
        owner = await conn.fetchval(
            "SELECT pg_has_role(current_user, tableowner, 'USAGE') FROM pg_tables"
            " WHERE tablename = 'audit_events'")
        if not owner:
            raise PermissionError(
                "listing every tenant's audit chain needs the database owner "
                "(SWITCHYARD_POSTGRES__OWNER_DSN); name one tenant instead")
        rows = await conn.fetch("SELECT tenant_id FROM audit_chain_heads"
                                " UNION SELECT DISTINCT tenant_id FROM audit_events ORDER BY 1")
    return [row["tenant_id"] for row in rows]

