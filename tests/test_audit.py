"""The audit trail: an audited action over HTTP becomes one event on `audit.events` and one row
in its tenant's hash chain, however often Kafka delivers it; a changed or removed row is found
by `switchyard audit verify`; the gateway's role can add rows but never change them; and GET
/v1/audit serves a tenant its own trail, filtered and paged, in the seed SDK's JSON types."""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jsonschema
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from pydantic import ValidationError

from compose.gateway import Gateway
from compose.stack import LocalStack
from ingress.audit import AuditLog
from state.audit import AuditQuery, append_event, chained_tenants, list_entries, verify_chain
from state.keys import create_key
from tests.conftest import eventually
from tests.kafka_util import read_topic
from topics import names
from topics.audit import (
    GENESIS_HASH,
    AuditEvent,
    ChainRow,
    audit_json_schema,
    new_event,
    row_hash,
    trace_id_of,
)
from topics.errors import Unavailable
from topics.kafka import make_producer

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "topics/schemas/audit.v1.json"
AUDIT = "/v1/audit"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@dataclass
class Tenant:
    id: str
    key_id: str
    http: httpx.AsyncClient


async def _new_tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    key_id, api_key = await create_key(pg, f"audit-{uuid.uuid4().hex[:12]}")
    tenant_id: str = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        yield Tenant(tenant_id, key_id, http)
    # The tenant goes; its audit trail stays (no foreign key, and rows cannot be deleted).
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


@pytest.fixture
async def tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


@pytest.fixture
async def other_tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


def event(tenant_id: str, action: str = "routing_policy.updated", **fields: Any) -> AuditEvent:
    return new_event(tenant_id=tenant_id, actor=fields.pop("actor", "k_test"), action=action,
                     **fields)


def lone_tenant() -> str:
    """A tenant id of its own, for chains written straight through `append_event`."""
    return f"t_audit_{uuid.uuid4().hex[:12]}"


async def rows_of(pg: asyncpg.Pool, tenant_id: str) -> list[asyncpg.Record]:
    return await pg.fetch("SELECT * FROM audit_events WHERE tenant_id = $1 ORDER BY seq",
                          tenant_id)


async def publish(gateway: Gateway, *values: bytes, key: bytes | None = None) -> None:
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(names.AUDIT, value, key=key)
    finally:
        await producer.stop()


async def cli_verify(gateway: Gateway, *args: str) -> tuple[int, str]:
    env = {**os.environ, **gateway.settings.to_env()}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compose.cli", "audit", "verify", *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await cli.communicate())[0].decode()
    assert cli.returncode is not None
    return cli.returncode, out


async def tamper(pg: asyncpg.Pool, statement: str, *args: Any) -> None:
    """Run `statement` as someone with every right on the database (the owner, a superuser),
    past the append-only trigger: what the hash chain is there to expose."""
    async with pg.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(statement, *args)


# ------------------------------------------------------------------ from an action to a row

async def test_vault_changes_over_http_become_one_row_each_even_when_redelivered(
        tenant: Tenant, pg: asyncpg.Pool, gateway: Gateway) -> None:
    first, second = (f"sk-test-{secrets.token_urlsafe(24)}" for _ in range(2))
    stored = await tenant.http.post("/v1/vault/keys", headers={"traceparent": TRACEPARENT},
                                    json={"provider": "openai", "api_key": first,
                                          "config": {"organization": "org-1"}})
    assert stored.status_code == 201, stored.text
    rotated = await tenant.http.post("/v1/vault/keys/openai/rotate", json={"api_key": second})
    assert rotated.status_code == 200, rotated.text
    assert (await tenant.http.delete("/v1/vault/keys/openai")).status_code == 200

    rows = await eventually(lambda: _at_least(pg, tenant.id, 3))
    assert [(r["seq"], r["action"]) for r in rows] == [
        (1, "vault.key_stored"), (2, "vault.key_rotated"), (3, "vault.key_deleted")]
    store = rows[0]
    assert (store["actor"], store["actor_role"], store["target"]) == (
        tenant.key_id, "tenant_admin", "openai")
    assert store["request_id"] == stored.headers["x-request-id"]
    assert store["trace_id"] == TRACE_ID
    assert store["source_ip"] == "127.0.0.1"
    assert orjson.loads(store["details"]) == {
        "provider": "openai", "last4": first[-4:], "master_key_id": "k1",
        "config_fields": ["organization"], "replaced": False}
    written = str([dict(row) for row in rows])
    assert first not in written  # never the key itself, in any column
    assert second not in written

    # The event as it travelled: schema-valid, and delivered twice more it adds nothing.
    records = await read_topic(gateway.settings.kafka, names.AUDIT, lambda rs: any(
        (names.H_REQUEST_ID, stored.headers["x-request-id"].encode()) in r.headers for r in rs))
    record = next(r for r in records if orjson.loads(r.value)["event_id"] == str(
        store["event_id"]))
    assert record.key == tenant.id.encode()
    jsonschema.validate(orjson.loads(record.value), orjson.loads(SCHEMA.read_bytes()))
    marker = event(tenant.id, "budget.updated")  # after the copies, on the same partition
    await publish(gateway, record.value, record.value, marker.to_json(), key=record.key)
    rows = await eventually(lambda: _at_least(pg, tenant.id, 4))
    assert [r["action"] for r in rows] == [
        "vault.key_stored", "vault.key_rotated", "vault.key_deleted", "budget.updated"]
    report = await verify_chain(pg, tenant.id)
    assert (report.ok, report.rows, report.head_hash) == (True, 4, rows[-1]["hash"])


async def _at_least(pg: asyncpg.Pool, tenant_id: str, n: int) -> list[asyncpg.Record] | None:
    rows = await rows_of(pg, tenant_id)
    return rows if len(rows) >= n else None


async def test_routing_policy_changes_are_audited_and_a_delete_of_nothing_is_not(
        tenant: Tenant, pg: asyncpg.Pool) -> None:
    assert (await tenant.http.delete("/v1/routing/policy")).json()["deleted"] is False
    put = await tenant.http.put("/v1/routing/policy", json={"allowed_providers": ["openai"]})
    assert put.status_code == 200, put.text
    assert (await tenant.http.delete("/v1/routing/policy")).json()["deleted"] is True

    rows = await eventually(lambda: _at_least(pg, tenant.id, 2))
    assert [r["action"] for r in rows] == ["routing_policy.updated", "routing_policy.deleted"]
    assert orjson.loads(rows[0]["details"])["policy"]["allowed_providers"] == ["openai"]
    assert rows[0]["request_id"] == put.headers["x-request-id"]


async def test_an_unpublished_event_is_a_503_and_is_logged_whole(
        gateway: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    # Kafka cannot acknowledge within a microsecond: the same path as a broker that is down.
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        audit = AuditLog(producer, publish_timeout_s=1e-6, registry=CollectorRegistry())
        lost = event(lone_tenant(), "vault.key_deleted", target="openai")
        with pytest.raises(Unavailable) as refused:
            await audit.publish(lost)
    finally:
        await producer.stop()
    assert refused.value.code == "audit_unavailable"
    assert refused.value.retry_after_s is not None
    assert "the change was applied" in refused.value.message
    assert str(lost.event_id) in caplog.text  # the operator can still publish it by hand


# ----------------------------------------------------------------------- the chain itself

async def test_concurrent_writers_of_one_tenant_never_fork_its_chain(pg: asyncpg.Pool) -> None:
    tenant_id = lone_tenant()
    events = [event(tenant_id, actor=f"k_{i}") for i in range(24)]
    added = await asyncio.gather(*(append_event(pg, e) for e in [*events, *events[:6]]))
    assert sum(added) == 24  # the six repeats added nothing
    rows = await rows_of(pg, tenant_id)
    assert [r["seq"] for r in rows] == list(range(1, 25))
    assert rows[0]["prev_hash"] == GENESIS_HASH
    assert all(later["prev_hash"] == earlier["hash"]
               for earlier, later in itertools.pairwise(rows))
    assert (await verify_chain(pg, tenant_id)).ok


async def test_an_edited_row_fails_verify_naming_that_row(
        pg: asyncpg.Pool, gateway: Gateway) -> None:
    tenant_id = lone_tenant()
    for action in ("vault.key_stored", "vault.key_rotated", "vault.key_deleted"):
        await append_event(pg, event(tenant_id, action, details={"provider": "openai"}))
    code, out = await cli_verify(gateway, "--tenant", tenant_id)
    assert code == 0, out
    assert f"OK      tenant {tenant_id}: 3 rows" in out

    edited = (await rows_of(pg, tenant_id))[1]
    await tamper(pg, "UPDATE audit_events SET details = '{\"provider\": \"gemini\"}'"
                 " WHERE event_id = $1", edited["event_id"])
    code, out = await cli_verify(gateway, "--tenant", tenant_id)
    assert code == 1
    assert f"BROKEN  tenant {tenant_id} at row 2 (event {edited['event_id']})" in out
    assert "altered" in out

    # Every chain at once (the owner's view): this one is named among them.
    code, out = await cli_verify(gateway)
    assert code == 1
    assert f"BROKEN  tenant {tenant_id} at row 2" in out


async def test_a_row_whose_hash_was_recomputed_still_breaks_the_next_link(
        pg: asyncpg.Pool) -> None:
    tenant_id = lone_tenant()
    for _ in range(3):
        await append_event(pg, event(tenant_id))
    row = (await rows_of(pg, tenant_id))[0]
    forged = replace(_chain_row(row), actor="someone_else")
    await tamper(pg, "UPDATE audit_events SET actor = $2, hash = $3 WHERE event_id = $1",
                 row["event_id"], forged.actor, row_hash(forged))
    report = await verify_chain(pg, tenant_id)
    assert (report.ok, report.broken_seq) == (False, 2)
    assert "does not follow row 1" in str(report.problem)


async def test_a_removed_row_breaks_the_chain_the_newest_one_too(pg: asyncpg.Pool) -> None:
    middle, newest = lone_tenant(), lone_tenant()
    for tenant_id in (middle, newest):
        for _ in range(3):
            await append_event(pg, event(tenant_id))
    await tamper(pg, "DELETE FROM audit_events WHERE tenant_id = $1 AND seq = 2", middle)
    await tamper(pg, "DELETE FROM audit_events WHERE tenant_id = $1 AND seq = 3", newest)

    gap = await verify_chain(pg, middle)
    assert (gap.ok, gap.broken_seq) == (False, 2)
    assert "row 2 is missing" in str(gap.problem)
    tail = await verify_chain(pg, newest)
    assert (tail.ok, tail.broken_seq) == (False, 3)
    assert "newer rows were removed" in str(tail.problem)


async def test_the_gateway_role_can_read_but_never_change_or_remove_a_row(
        pg: asyncpg.Pool) -> None:
    tenant_id = lone_tenant()
    await append_event(pg, event(tenant_id))
    for statement in ("UPDATE audit_events SET actor = 'x' WHERE tenant_id = $1",
                      "DELETE FROM audit_events WHERE tenant_id = $1"):
        async with pg.acquire() as conn:
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="permission denied"):
                await as_gateway_role(conn, tenant_id, statement)
            # The owner is stopped too: by the trigger, which privileges cannot lift.
            with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
                await conn.execute(statement, tenant_id)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await pg.execute("TRUNCATE audit_events")

    async with pg.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL ROLE switchyard_app")
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant_id)
        assert await conn.fetchval("SELECT count(*) FROM audit_events") == 1
        # Row-level security: acting for another tenant, the row is not there.
        await conn.execute("SELECT set_config('app.tenant_id', 'someone-else', true)")
        assert await conn.fetchval("SELECT count(*) FROM audit_events") == 0
    assert (await verify_chain(pg, tenant_id)).ok


async def test_the_gateway_role_appends_verifies_and_reads_under_row_level_security(
        stack: LocalStack) -> None:
    # What the writer and the ingress do once they connect as the gateway's role, which
    # row-level security applies to (the session stack's owner bypasses it).
    pool = await asyncpg.create_pool(stack.settings.postgres.dsn, min_size=1, max_size=2,
                                     server_settings={"role": "switchyard_app"})
    try:
        assert await pool.fetchval("SELECT current_user") == "switchyard_app"
        mine, other = lone_tenant(), lone_tenant()
        first = event(mine)
        assert await append_event(pool, first)
        assert not await append_event(pool, first)
        assert await append_event(pool, event(mine))
        assert await append_event(pool, event(other))
        report = await verify_chain(pool, mine)
        assert (report.ok, report.rows) == (True, 2)
        page = await list_entries(pool, AuditQuery(tenant_id=mine, limit=10))
        assert [row["seq"] for row in page.rows] == [2, 1]
        assert await pool.fetchval("SELECT count(*) FROM audit_events") == 0  # no tenant set
        with pytest.raises(PermissionError, match="needs the database owner"):
            await chained_tenants(pool)
    finally:
        await pool.close()


async def as_gateway_role(conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
                          tenant_id: str, statement: str) -> None:
    async with conn.transaction():
        await conn.execute("SET LOCAL ROLE switchyard_app")
        await conn.execute("SELECT set_config('app.tenant_id', $1, true)", tenant_id)
        await conn.execute(statement, tenant_id)


def _chain_row(record: asyncpg.Record) -> ChainRow:
    fields = {k: v for k, v in record.items() if k != "hash"}
    return ChainRow(**{**fields, "event_id": str(fields["event_id"])})


def test_the_hash_covers_every_field_of_a_row() -> None:
    moment = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    row = ChainRow(event_id=str(uuid.uuid4()), tenant_id="t", seq=1, occurred_at=moment,
                   recorded_at=moment, actor="k", actor_role="viewer", action="key.created",
                   target="k2", details='{"a":1}', request_id="req_1", trace_id=TRACE_ID,
                   source_ip="10.0.0.1", prev_hash=GENESIS_HASH)
    changes: dict[str, Any] = {
        "event_id": str(uuid.uuid4()), "tenant_id": "u", "seq": 2,
        "occurred_at": moment + timedelta(microseconds=1),
        "recorded_at": moment - timedelta(microseconds=1), "actor": "j", "actor_role": None,
        "action": "key.revoked", "target": None, "details": '{"a":2}', "request_id": None,
        "trace_id": None, "source_ip": "10.0.0.2", "prev_hash": "1" * 64}
    assert set(changes) == set(ChainRow.__dataclass_fields__)
    digest = row_hash(row)
    assert len(digest) == 64
    for name, value in changes.items():
        assert row_hash(replace(row, **{name: value})) != digest, name


def test_an_event_never_carries_a_secret_and_never_repeats_a_refused_value() -> None:
    secret = "sk-live-do-not-log-me"
    for details in ({"api_key": secret}, {"nested": {"Access-Token": secret}},
                    {"list": [{"password": secret}]}):
        with pytest.raises(ValidationError) as refused:
            event("t", details=details)
        assert "must not carry secrets" in str(refused.value)
        assert secret not in str(refused.value)
    assert event("t", details={"key_id": "k_1", "last4": "abcd"}).details["key_id"] == "k_1"
    assert trace_id_of(TRACEPARENT) == TRACE_ID
    assert trace_id_of("garbage") is None


def test_published_audit_schema_is_the_one_the_code_emits() -> None:
    assert orjson.loads(SCHEMA.read_bytes()) == audit_json_schema(), (
        "regenerate topics/schemas/audit.v1.json (docs/audit.md: 'The event') and bump the "
        "version if the change is not backward compatible")


async def test_a_malformed_audit_message_goes_to_the_dlq_with_its_reason(
        gateway: Gateway) -> None:
    garbage = b'{"schema_version": 1, "event_id": "not-a-uuid"}'
    leaky = orjson.dumps({**orjson.loads(event("t_dlq").to_json()),
                          "details": {"token": "eyJ-not-here"}})
    await publish(gateway, garbage, leaky)
    records = await read_topic(gateway.settings.kafka, names.dlq(names.AUDIT),
                               lambda rs: {garbage, leaky} <= {r.value for r in rs})
    for value in (garbage, leaky):
        dead = next(r for r in records if r.value == value)
        reason = dict(dead.headers)[names.H_DLQ_REASON]
        assert reason.startswith(b"undecodable")
        assert b"eyJ-not-here" not in reason


# ------------------------------------------------------------------------- GET /v1/audit

async def _trail(pg: asyncpg.Pool, tenant: Tenant) -> list[AuditEvent]:
    """Seven events an hour apart: two actors, three actions."""
    start = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    events = [event(tenant.id, action, actor=actor, target=f"target-{i}",
                    details={"n": i, "nested": {"ok": True}},
                    occurred_at=start + timedelta(hours=i))
              for i, (action, actor) in enumerate([
                  ("key.created", tenant.key_id), ("key.rotated", tenant.key_id),
                  ("budget.updated", "u_alice"), ("key.revoked", tenant.key_id),
                  ("budget.updated", "u_alice"), ("key.created", "u_alice"),
                  ("budget.updated", tenant.key_id)])]
    for e in events:
        assert await append_event(pg, e)
    return events


async def _all_pages(http: httpx.AsyncClient, **params: Any) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    cursor = None
    while True:
        response = await http.get(AUDIT, params={**params, **({"cursor": cursor} if cursor
                                                               else {})})
        assert response.status_code == 200, response.text
        body = response.json()
        entries += body["entries"]
        assert body["has_more"] is (body["next_cursor"] is not None)
        if not body["has_more"]:
            return entries
        cursor = body["next_cursor"]


async def test_the_trail_is_served_newest_first_in_the_seed_sdks_types(
        tenant: Tenant, pg: asyncpg.Pool) -> None:
    events = await _trail(pg, tenant)
    response = await tenant.http.get(AUDIT)
    assert response.status_code == 200
    body = response.json()
    assert (body["object"], body["has_more"], body["next_cursor"]) == ("list", False, None)
    entries = body["entries"]
    assert [e["id"] for e in entries] == [str(e.event_id) for e in reversed(events)]
    newest = entries[0]
    assert [type(newest[field]) for field in ("id", "action", "timestamp", "user", "details")] \
        == [str, str, str, str, dict]
    assert newest["timestamp"] == "2026-03-01T18:00:00.000000Z"
    assert datetime.fromisoformat(newest["timestamp"]) == events[-1].occurred_at
    assert newest["details"] == {"n": 6, "nested": {"ok": True}}
    assert (newest["action"], newest["user"], newest["target"]) == (
        "budget.updated", tenant.key_id, "target-6")
    assert (newest["seq"], len(newest["hash"])) == (7, 64)


async def test_filters_and_cursor_pages(tenant: Tenant, pg: asyncpg.Pool) -> None:
    events = await _trail(pg, tenant)
    ids = [str(e.event_id) for e in events]

    paged = await _all_pages(tenant.http, limit=2)
    assert [e["id"] for e in paged] == ids[::-1]  # every entry once, newest first

    budget = await _all_pages(tenant.http, action="budget.updated", limit=1)
    assert [e["id"] for e in budget] == [ids[6], ids[4], ids[2]]
    alice = await _all_pages(tenant.http, actor="u_alice")
    assert [e["id"] for e in alice] == [ids[5], ids[4], ids[2]]
    both = await _all_pages(tenant.http, actor="u_alice", action="budget.updated")
    assert [e["id"] for e in both] == [ids[4], ids[2]]
    # since is inclusive, until exclusive; an offset sent unescaped ("+" is a space) still counts
    window = await _all_pages(tenant.http, since="2026-03-01T13:00:00Z",
                              until="2026-03-01T14:00:00+00:00")
    assert [e["id"] for e in window] == [ids[1]]
    later = await tenant.http.get(f"{AUDIT}?since=2026-03-01T17:00:00+00:00")
    assert [e["id"] for e in later.json()["entries"]] == [ids[6], ids[5]]


@pytest.mark.parametrize(("query", "param"), [
    ("limit=0", "limit"), ("limit=501", "limit"), ("limit=many", "limit"),
    ("since=yesterday", "since"), ("until=2026-03-01T12:00:00", "until"),
    ("cursor=bogus", "cursor"), ("acton=key.created", "acton")])
async def test_bad_queries_are_422_naming_the_parameter(tenant: Tenant, query: str,
                                                        param: str) -> None:
    response = await tenant.http.get(f"{AUDIT}?{query}")
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


async def test_a_tenant_never_sees_another_tenants_trail(
        tenant: Tenant, other_tenant: Tenant, pg: asyncpg.Pool) -> None:
    mine = await _trail(pg, tenant)
    theirs = await _trail(pg, other_tenant)
    seen = await _all_pages(tenant.http, limit=500)
    assert {e["id"] for e in seen} == {str(e.event_id) for e in mine}
    assert not {str(e.event_id) for e in theirs} & {e["id"] for e in seen}
    # Naming the other tenant's actor finds nothing either.
    assert (await _all_pages(tenant.http, actor=other_tenant.key_id)) == []
