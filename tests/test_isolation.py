"""Tenants are kept apart by PostgreSQL itself: with the application role the gateway's
processes use, a query that forgets its tenant sees nothing of another tenant's, and no write
reaches another tenant's rows, whatever the query says.

The tests run against a database of their own in the session's PostgreSQL, migrated by an owner
role that is not a superuser (as on a managed PostgreSQL, where the migrating role is an
ordinary one): row-level security then binds the owner too, which the local stack's superuser
owner would bypass. The application role is the session stack's, `switchyard_app`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from decimal import Decimal
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from compose.stack import LocalStack
from state.keys import find_key, hash_key, seed_key
from state.migrations import apply_migrations, ensure_app_login
from state.routing_policy import put_policy
from state.tenancy import (
    APP_ROLE,
    Connection,
    PrivilegedRoleError,
    act_for,
    check_app_role,
    platform_scope,
    tenant_scope,
)
from state.usage import record_usage
from state.vault import MasterKeys, put_key
from topics.messages import UsageEvent
from topics.routing_policy import RoutingPolicy

# Every table that holds tenants' rows, and the column naming the tenant.
TENANT_TABLES = {"tenants": "id", "api_keys": "tenant_id", "usage_events": "tenant_id",
                 "usage_daily": "tenant_id", "provider_keys": "tenant_id",
                 "routing_policies": "tenant_id"}
MASTER = MasterKeys.parse(MasterKeys.generate("k1"), "k1")


@dataclass
class Tenant:
    id: str
    api_key: str


@dataclass
class Isolated:
    owner_role: str
    owner: asyncpg.Pool  # the migrating role: owns the tables, not a superuser
    app: asyncpg.Pool  # the processes' role
    a: Tenant
    b: Tenant


def _dsn(dsn: str, user: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(netloc=f"{user}@{parts.hostname}:{parts.port}",
                                     path=f"/{database}"))


def usage(tenant: str, n: int) -> list[UsageEvent]:
    return [UsageEvent(
        event_id=str(uuid.uuid4()), request_id=f"r-{uuid.uuid4().hex}", tenant_id=tenant,
        key_id="k", provider="p", model="m", status="ok", prompt_tokens=10,
        completion_tokens=1, cost_usd=Decimal("0.001"), latency_ms=1.0,
        started_at_ms=1_700_000_000_000 + i, finished_at_ms=1_700_000_000_100 + i)
        for i in range(n)]


@pytest.fixture(scope="module")
async def isolated(stack: LocalStack, pg: asyncpg.Pool) -> AsyncIterator[Isolated]:
    """A fresh database whose owner is an ordinary role, migrated by it, with two tenants
    that each have a key, usage, a stored provider key and a routing policy, all written
    through the application role like the gateway writes them."""
    suffix = uuid.uuid4().hex[:8]
    owner_role, database = f"owner_{suffix}", f"isolation_{suffix}"
    await pg.execute(f"CREATE ROLE {owner_role} LOGIN NOSUPERUSER NOBYPASSRLS CREATEROLE")
    await pg.execute(f"CREATE DATABASE {database} OWNER {owner_role}")
    owner_dsn = _dsn(stack.settings.postgres.owner_dsn, owner_role, database)
    app_dsn = _dsn(stack.settings.postgres.dsn, APP_ROLE, database)
    assert "005_isolation.sql" in await apply_migrations(owner_dsn)
    await ensure_app_login(owner_dsn, app_dsn)
    owner = await asyncpg.create_pool(owner_dsn, min_size=1, max_size=2)
    app = await asyncpg.create_pool(app_dsn, min_size=1, max_size=4)
    try:
        tenants = []
        for name in ("a", "b"):
            api_key = f"sy-{name}-{uuid.uuid4().hex}"
            await seed_key(owner, name, api_key)
            found = await find_key(app, api_key)
            assert found is not None
            tenants.append(Tenant(found.tenant_id, api_key))
        a, b = tenants
        await record_usage(app, usage(a.id, 2) + usage(b.id, 3))  # one batch, both tenants
        for t in tenants:
            await put_key(app, MASTER, t.id, "openai", f"sk-{t.id}", {})
            await put_policy(app, t.id, RoutingPolicy(default_mode="council"))
        yield Isolated(owner_role, owner, app, a, b)
    finally:
        await app.close()
        await owner.close()
        await pg.execute(f"DROP DATABASE {database} WITH (FORCE)")
        await pg.execute(f"DROP ROLE {owner_role}")


@asynccontextmanager
async def rolled_back(pool: asyncpg.Pool, tenant_id: str) -> AsyncIterator[Connection]:
    """A transaction acting for `tenant_id` whose writes are undone afterwards."""
    async with pool.acquire() as conn:
        transaction = conn.transaction()
        await transaction.start()
        try:
            await act_for(conn, tenant_id)
            yield conn
        finally:
            await transaction.rollback()


async def owners_view(iso: Isolated, table: str) -> dict[str, int]:
    """Rows per tenant as the owner sees them in platform scope: the ground truth."""
    column = TENANT_TABLES[table]
    async with platform_scope(iso.owner) as conn:
        rows = await conn.fetch(f"SELECT {column} AS t, count(*) AS n FROM {table} GROUP BY 1")
    return {r["t"]: r["n"] for r in rows}


# ------------------------------------------------------------------------------ the roles


async def test_the_app_role_owns_nothing_bypasses_nothing_and_cannot_become_the_owner(
        isolated: Isolated, app_pg: asyncpg.Pool) -> None:
    for pool in (isolated.app, app_pg):  # this database's, and the gateway's own
        role = await pool.fetchrow(
            "SELECT rolname, rolsuper, rolbypassrls, rolcreaterole, rolcreatedb FROM pg_roles"
            " WHERE rolname = current_user")
        assert role is not None
        assert not any(role[a] for a in ("rolsuper", "rolbypassrls", "rolcreaterole",
                                         "rolcreatedb")), dict(role)
        assert await pool.fetchval(
            "SELECT count(*) FROM pg_class WHERE pg_has_role(current_user, relowner, 'MEMBER')"
            " AND relnamespace = 'public'::regnamespace") == 0
        await check_app_role(pool)  # what every process checks at start
    async with isolated.app.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(f"SET ROLE {isolated.owner_role}")


async def test_a_process_refuses_to_start_as_the_owner(isolated: Isolated,
                                                       pg: asyncpg.Pool) -> None:
    with pytest.raises(PrivilegedRoleError, match="owns"):
        await check_app_role(isolated.owner)  # an ordinary role, but it owns the tables
    with pytest.raises(PrivilegedRoleError, match="superuser"):
        await check_app_role(pg)  # the local stack's owner


async def test_every_table_with_tenants_rows_has_forced_row_level_security(
        isolated: Isolated) -> None:
    """Any table with a tenant_id column, now or added later, and tenants itself."""
    tables = await isolated.owner.fetch(
        "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,"
        " ARRAY(SELECT polname::text FROM pg_policy WHERE polrelid = c.oid ORDER BY 1) AS p"
        " FROM pg_class c WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace"
        " AND (c.relname = 'tenants' OR EXISTS (SELECT FROM pg_attribute a"
        " WHERE a.attrelid = c.oid AND a.attname = 'tenant_id' AND NOT a.attisdropped))")
    assert {t["relname"] for t in tables} >= set(TENANT_TABLES)
    for t in tables:
        assert t["relrowsecurity"], t["relname"]
        assert t["relforcerowsecurity"], t["relname"]
        assert "tenant_isolation" in t["p"], t["relname"]


# ------------------------------------------------------------------------------ reading


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
async def test_an_unfiltered_select_sees_only_the_scopes_tenant(isolated: Isolated,
                                                                table: str) -> None:
    truth = await owners_view(isolated, table)
    assert truth.get(isolated.a.id)  # both have rows
    assert truth.get(isolated.b.id)
    column = TENANT_TABLES[table]
    for tenant in (isolated.a, isolated.b):
        async with tenant_scope(isolated.app, tenant.id) as conn:
            seen = [r[0] for r in await conn.fetch(f"SELECT {column} FROM {table}")]
        assert set(seen) == {tenant.id}
        assert len(seen) == truth[tenant.id]


@pytest.mark.parametrize("table", sorted(TENANT_TABLES))
async def test_a_query_outside_any_tenant_scope_sees_nothing(isolated: Isolated,
                                                             table: str) -> None:
    async with isolated.app.acquire() as conn:
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        # After a scope ended on this connection, the setting reads '' rather than NULL.
        async with conn.transaction():
            await act_for(conn, isolated.a.id)
        assert await conn.fetchval("SELECT current_setting('app.tenant_id')") == ""
        assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
        # Asking to be the platform does nothing for this role: the policy is the owner's.
        async with conn.transaction():
            await conn.execute("SELECT set_config('app.platform', 'on', true)")
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0


async def test_the_owner_too_sees_nothing_unless_it_says_it_acts_for_the_platform(
        isolated: Isolated) -> None:
    """FORCE ROW LEVEL SECURITY: an owner's forgetful query is as empty as anyone's."""
    for table in TENANT_TABLES:
        assert await isolated.owner.fetchval(f"SELECT count(*) FROM {table}") == 0
        assert set(await owners_view(isolated, table)) >= {isolated.a.id, isolated.b.id}


# ------------------------------------------------------------------------------ writing


async def test_another_tenants_rows_cannot_be_changed_or_deleted(isolated: Isolated) -> None:
    a, b = isolated.a, isolated.b
    before = {t: await owners_view(isolated, t) for t in TENANT_TABLES}
    async with rolled_back(isolated.app, a.id) as conn:
        # Unfiltered: only A's rows are touched.
        assert await conn.execute("UPDATE provider_keys SET last4 = 'XXXX'") == "UPDATE 1"
        assert await conn.execute("DELETE FROM routing_policies") == "DELETE 1"
        assert await conn.execute("UPDATE usage_daily SET requests = 0") == "UPDATE 1"
        assert await conn.execute("UPDATE api_keys SET revoked_at = now()") == "UPDATE 1"
        # The admin API suspends a tenant by writing its own row (007_tenant_admin.sql).
        assert await conn.execute("UPDATE tenants SET suspended_reason = 'x'") == "UPDATE 1"
        assert await conn.execute("UPDATE tenants SET status = 'suspended' WHERE id = $1",
                                  b.id) == "UPDATE 0"
        # Aimed at B: nothing matches.
        for table in ("provider_keys", "routing_policies"):
            assert await conn.execute(f"DELETE FROM {table} WHERE tenant_id = $1",
                                      b.id) == "DELETE 0"
        assert await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE tenant_id = $1",
                                  b.id) == "UPDATE 0"
        # Handing one of A's rows to B is refused.
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute("UPDATE provider_keys SET tenant_id = $1", b.id)
    async with rolled_back(isolated.app, a.id) as conn:
        # The ledger is append-only for everyone's rows, A's included.
        for statement in ("UPDATE usage_events SET cost_usd = 0", "DELETE FROM usage_events",
                          "DELETE FROM usage_daily", "DELETE FROM api_keys",
                          "DELETE FROM tenants", "TRUNCATE provider_keys"):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with conn.transaction():  # a savepoint: the next statement may run
                    await conn.execute(statement)
    after = {t: await owners_view(isolated, t) for t in TENANT_TABLES}
    assert after == before


@pytest.mark.parametrize(("table", "insert"), [
    ("provider_keys", "INSERT INTO provider_keys (tenant_id, provider, master_key_id, nonce,"
                      " ciphertext, last4) VALUES ($1, 'gemini', 'k1',"
                      " '\\x000000000000000000000000', '\\x00', '0000')"),
    ("routing_policies", "INSERT INTO routing_policies (tenant_id, policy) VALUES ($1, '{}')"),
    ("api_keys", "INSERT INTO api_keys (id, tenant_id, key_sha256, prefix)"
                 " VALUES ('k_planted', $1, '\\x01', 'sy-plant')"),
    ("usage_daily", "INSERT INTO usage_daily VALUES ($1, '2026-01-01', 'm', 1, 1, 1, 1, 0, 1)"),
    ("usage_events", "INSERT INTO usage_events (event_id, request_id, tenant_id, key_id,"
                     " provider, model, mode, status, prompt_tokens, completion_tokens,"
                     " cached_tokens, estimated, cost_usd, latency_ms, attempt, started_at,"
                     " finished_at) VALUES (gen_random_uuid(), 'r', $1, 'k', 'p', 'm', 'auto',"
                     " 'ok', 1, 1, 0, false, 1, 1, 1, now(), now())"),
])
async def test_a_row_for_another_tenant_cannot_be_written(isolated: Isolated, table: str,
                                                          insert: str) -> None:
    async with rolled_back(isolated.app, isolated.a.id) as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.execute(insert, isolated.b.id)


async def test_a_usage_batch_of_many_tenants_is_written_each_under_its_own(
        isolated: Isolated) -> None:
    before = await owners_view(isolated, "usage_events")
    batch = usage(isolated.a.id, 4) + usage(isolated.b.id, 1)
    await record_usage(isolated.app, batch)
    await record_usage(isolated.app, batch)  # a replay changes nothing
    after = await owners_view(isolated, "usage_events")
    assert after[isolated.a.id] == before[isolated.a.id] + 4
    assert after[isolated.b.id] == before[isolated.b.id] + 1
    async with platform_scope(isolated.owner) as conn:
        requests = await conn.fetch("SELECT tenant_id, sum(requests) AS n FROM usage_daily"
                                    " GROUP BY 1")
    assert {r["tenant_id"]: r["n"] for r in requests} == after  # the rollup agrees


# ------------------------------------------------------------------------------ DDL


@pytest.mark.parametrize("statement", [
    "ALTER TABLE provider_keys DISABLE ROW LEVEL SECURITY",
    "ALTER TABLE provider_keys NO FORCE ROW LEVEL SECURITY",
    "DROP POLICY tenant_isolation ON provider_keys",
    "CREATE POLICY everything ON provider_keys USING (true)",
    "ALTER FUNCTION switchyard_find_key(bytea) OWNER TO switchyard_app",
    "CREATE TABLE public.mine (x int)",
])
async def test_the_app_role_cannot_change_the_rules(isolated: Isolated, statement: str) -> None:
    async with isolated.app.acquire() as conn:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute(statement)


async def test_row_security_cannot_be_switched_off_by_the_app_role(isolated: Isolated) -> None:
    async with isolated.app.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL row_security = off")
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="row-level security"):
            await conn.fetch("SELECT * FROM provider_keys")


# ------------------------------------------------------------------------------ the key lookup


async def test_the_key_lookup_finds_any_tenants_key_and_nothing_else(isolated: Isolated) -> None:
    for tenant in (isolated.a, isolated.b):
        found = await find_key(isolated.app, tenant.api_key)
        assert found is not None
        assert found.tenant_id == tenant.id
    assert await find_key(isolated.app, "sy-nobodys-key") is None
    # The table itself stays closed: the lookup is the one way in, by the key's hash.
    assert await isolated.app.fetchval("SELECT count(*) FROM api_keys WHERE key_sha256 = $1",
                                       hash_key(isolated.a.api_key)) == 0
    async with rolled_back(isolated.app, isolated.a.id) as conn:
        await conn.execute("UPDATE api_keys SET revoked_at = now()")
        assert await conn.fetchval("SELECT count(*) FROM switchyard_find_key($1)",
                                   hash_key(isolated.a.api_key)) == 0  # revoked: gone


async def test_the_key_lookup_cannot_be_led_astray_by_the_callers_objects(
        isolated: Isolated) -> None:
    """It runs as the owner: objects the caller creates must not stand in for ours."""
    async with isolated.app.acquire() as conn, conn.transaction():
        await conn.execute("CREATE TEMP TABLE api_keys (LIKE public.api_keys INCLUDING ALL)"
                           " ON COMMIT DROP")
        await conn.execute("INSERT INTO api_keys (id, tenant_id, key_sha256, prefix)"
                           " VALUES ('k_fake', $1, $2, 'sy-fake')", isolated.b.id,
                           hash_key("sy-forged"))
        assert await conn.fetchval("SELECT count(*) FROM api_keys") == 1  # it is there
        assert await conn.fetchval("SELECT count(*) FROM switchyard_find_key($1)",
                                   hash_key("sy-forged")) == 0
        found = await conn.fetchrow("SELECT (api_key).tenant_id FROM switchyard_find_key($1)",
                                    hash_key(isolated.a.api_key))
        assert found is not None
        assert found["tenant_id"] == isolated.a.id
