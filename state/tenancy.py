"""The tenant a database transaction acts for: what PostgreSQL's row-level security reads.

Every query on a tenant-owned table runs inside `tenant_scope(pool, tenant_id)`: one
transaction on one connection with the setting `app.tenant_id` set for that transaction
only (`set_config(..., true)`), so a pooled connection never carries a tenant into the next
borrower. The policies in `state/migrations/` compare each row's `tenant_id` with it; a query
that forgets its `WHERE tenant_id` sees only the caller's rows, and a write of another
tenant's row is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
from asyncpg.pool import PoolConnectionProxy

TENANT_SETTING = "app.tenant_id"


@asynccontextmanager
async def tenant_scope(pool: asyncpg.Pool,
                       tenant_id: str) -> AsyncIterator[PoolConnectionProxy[asyncpg.Record]]:
    """A connection in a transaction that acts for `tenant_id` only."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT set_config($1, $2, true)", TENANT_SETTING, tenant_id)
        yield conn
