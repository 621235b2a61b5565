"""The tenant a database transaction acts for: what PostgreSQL's row-level security reads.

Every query on a tenant-owned table runs inside `tenant_scope(pool, tenant_id)`: one
transaction on one connection with the setting `app.tenant_id` set for that transaction
only (`set_config(..., true)`), so a pooled connection never carries a tenant into the next
borrower. The policies of `state/migrations/005_isolation.sql` compare each row's tenant with
it; a query that forgets its `WHERE tenant_id` sees only the caller's rows, one that runs
outside any scope sees none, and a write of another tenant's row is refused.

The gateway's processes connect as the application role (`postgres.dsn`), which owns no table
and cannot bypass row-level security: `check_app_role` refuses to start a process on anything
more privileged. The owner role (`postgres.owner_dsn`: migrations, `switchyard init`, the
admin commands) does its deliberate cross-tenant work in `platform_scope`. How the roles are
set up: docs/operations.md, "Database roles and tenant isolation".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

# A connection of its own (asyncpg.connect) or one a pool lent.
Connection = asyncpg.Connection | PoolConnectionProxy

TENANT_SETTING = "app.tenant_id"
PLATFORM_SETTING = "app.platform"
# The role the processes act as; every grant of the migrations names it.
APP_ROLE = "switchyard_app"


class PrivilegedRoleError(RuntimeError):
    """A process was configured to connect as a role that row-level security does not bind."""


@asynccontextmanager
async def tenant_scope(pool: asyncpg.Pool, tenant_id: str) -> AsyncIterator[Connection]:
    """A connection in a transaction that acts for `tenant_id` only."""
    async with pool.acquire() as conn, conn.transaction():
        await act_for(conn, tenant_id)
        yield conn


async def act_for(conn: Connection, tenant_id: str) -> None:
    """Make the rest of `conn`'s current transaction act for `tenant_id` (until the next call).
    Only for a writer that holds one transaction across tenants (state/usage.py); everything
    else takes a `tenant_scope`."""
    if not tenant_id:
        raise ValueError("a tenant scope needs a tenant id")  # '' would match no row anyway
    await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, tenant_id)


@asynccontextmanager
async def platform_scope(db: asyncpg.Pool | Connection) -> AsyncIterator[Connection]:
    """A transaction in which the owner role sees every tenant's rows: for the admin commands
    (keys for a named tenant, the vault's re-encryption). The policy that reads it applies to
    the owner role only; under the application role this scope sees nothing."""
    if isinstance(db, asyncpg.Connection | PoolConnectionProxy):
        async with db.transaction():
            await db.execute("SELECT set_config($1, 'on', true)", PLATFORM_SETTING)
            yield db
    else:
        async with db.acquire() as conn, conn.transaction():
            await conn.execute("SELECT set_config($1, 'on', true)", PLATFORM_SETTING)
            yield conn


# The role itself, or any role it may become (SET ROLE), being a superuser, having BYPASSRLS,
# or owning a table under row-level security (an owner may switch it off) would undo the
# isolation: the processes must not run as such a role.
_PRIVILEGES = """
SELECT current_user AS role,
       EXISTS (SELECT FROM pg_roles r WHERE (r.rolsuper OR r.rolbypassrls)
               AND pg_has_role(current_user, r.oid, 'MEMBER')) AS bypasses,
       ARRAY(SELECT c.relname::text FROM pg_class c
             WHERE c.relrowsecurity AND pg_has_role(current_user, c.relowner, 'MEMBER')
             ORDER BY 1) AS owns
"""


async def check_app_role(conn: asyncpg.Pool | Connection) -> None:
    """Refuse a connection whose role row-level security would not bind (at process start)."""
    row = await conn.fetchrow(_PRIVILEGES)
    assert row is not None
    if row["bypasses"] or row["owns"]:
        why = ("is (or may become) a superuser or a role with BYPASSRLS" if row["bypasses"]
               else f"owns (or may become the owner of) {', '.join(row['owns'])}")
        raise PrivilegedRoleError(
            f"SWITCHYARD_POSTGRES__DSN connects as role {row['role']!r}, which {why}: "
            "row-level security would not keep tenants apart. The processes connect as "
            f"{APP_ROLE} (or a member of it); the owner role is for SWITCHYARD_POSTGRES__"
            "OWNER_DSN only (docs/operations.md, \"Database roles and tenant isolation\")")
