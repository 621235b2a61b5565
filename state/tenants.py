"""Tenants in PostgreSQL: created with their first API key, listed, suspended and resumed.

The platform's side of tenancy: `ingress/tenants.py` serves it to platform administrators
(`/v1/admin/tenants…`); `topics/tenants.py` states the tiers and their limits;
`state/keys.py` holds the tenants' keys. A suspension reaches every ingress and router at
once through `state/revocations.py` (the caller publishes it after the change is stored).

A query that acts for one tenant runs in `tenant_scope` (`state/tenancy.py`), the new
tenant's own included. `list_tenants` reads every tenant: it is the platform's view, for
platform administrators only.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from state.keys import ApiKey, insert_key
from state.tenancy import Connection, platform_scope, tenant_scope
from topics.errors import Conflict
from topics.identity import Role
from topics.tenants import TIER_LIMITS, Tier

FIRST_KEY_NAME = "first admin key"


@dataclass(frozen=True, slots=True)
class Tenant:
    tenant_id: str
    name: str
    tier: Tier
    suspended: bool
    created_at: datetime
    suspended_at: datetime | None
    suspended_reason: str | None
    monthly_budget_usd: Decimal | None  # None: the tier's

    def public(self) -> dict[str, Any]:
        """The JSON shape (datetimes become RFC 3339 strings when encoded)."""
        return {"tenant_id": self.tenant_id, "name": self.name, "tier": self.tier.value,
                "status": "suspended" if self.suspended else "active",
                "created_at": self.created_at, "suspended_at": self.suspended_at,
                "suspended_reason": self.suspended_reason,
                "limits": TIER_LIMITS[self.tier].public(self.monthly_budget_usd)}


_COLUMNS = ("id, name, tier, status, created_at, suspended_at, suspended_reason,"
            " monthly_budget_usd")


def _tenant(row: asyncpg.Record) -> Tenant:
    return Tenant(tenant_id=row["id"], name=row["name"], tier=Tier(row["tier"]),
                  suspended=row["status"] != "active", created_at=row["created_at"],
                  suspended_at=row["suspended_at"], suspended_reason=row["suspended_reason"],
                  monthly_budget_usd=row["monthly_budget_usd"])


async def create_tenant(pool: asyncpg.Pool, name: str, tier: Tier,
                        monthly_budget_usd: Decimal | None) -> tuple[Tenant, ApiKey, str]:
    """A new tenant and its first key, a `tenant_admin` one, in one transaction. Returns the
    tenant, the key's view and the key itself (shown once). 409 `tenant_exists` when the name
    is taken."""
    tenant_id = f"t_{uuid.uuid4().hex[:16]}"
    try:
        async with tenant_scope(pool, tenant_id) as conn:
            row = await conn.fetchrow(
                "INSERT INTO tenants (id, name, tier, monthly_budget_usd)"
                f" VALUES ($1, $2, $3, $4) RETURNING {_COLUMNS}",
                tenant_id, name, tier.value, monthly_budget_usd)
            assert row is not None
            key, api_key = await insert_key(conn, tenant_id, name=FIRST_KEY_NAME,
                                            role=Role.TENANT_ADMIN, expires_in=None,
                                            allowed_models=None)
    except asyncpg.UniqueViolationError:
        raise Conflict(f"a tenant named {name!r} exists already", code="tenant_exists",
                       param="name") from None
    return _tenant(row), key, api_key


async def list_tenants(pool: asyncpg.Pool) -> list[Tenant]:
    """Every tenant, oldest first: the platform's view, not a tenant's. Row-level security
    shows the application role one tenant at most: the list comes from a definer function
    (state/migrations/007_tenant_admin.sql), for platform administrators only."""
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM switchyard_list_tenants()"
                            " ORDER BY created_at, id")
    return [_tenant(row) for row in rows]


async def get_tenant(pool: asyncpg.Pool, tenant_id: str) -> Tenant | None:
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(f"SELECT {_COLUMNS} FROM tenants WHERE id = $1", tenant_id)
    return None if row is None else _tenant(row)


async def suspend_tenant(pool: asyncpg.Pool, tenant_id: str,
                         reason: str | None) -> Tenant | None:
    """Suspend the tenant: every key of it is refused (403 `tenant_suspended`) once the
    caches hear of it. Suspending a suspended tenant changes nothing (its first
    suspension's time and reason stay). None when there is no such tenant."""
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "UPDATE tenants SET status = 'suspended',"
            " suspended_at = coalesce(suspended_at, now()),"
            " suspended_reason = CASE WHEN status = 'suspended' THEN suspended_reason"
            " ELSE $2 END"
            f" WHERE id = $1 RETURNING {_COLUMNS}", tenant_id, reason)
    return None if row is None else _tenant(row)


async def resume_tenant(pool: asyncpg.Pool, tenant_id: str) -> Tenant | None:
    """Lift a suspension (idempotent). None when there is no such tenant."""
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "UPDATE tenants SET status = 'active', suspended_at = NULL,"
            f" suspended_reason = NULL WHERE id = $1 RETURNING {_COLUMNS}", tenant_id)
    return None if row is None else _tenant(row)


async def ensure_platform_admin(conn: Connection, tenant_name: str,
                                key_name: str) -> tuple[str, ApiKey, str]:
    """The platform tenant called `tenant_name` (created if missing, tier `scale`) and a new
    `platform_admin` key of it. Returns (tenant id, key view, the key itself). What
    `switchyard admin create` and the dev stack bootstrap the admin API with; run as the owner
role (a platform scope: no tenant's row to create)."""
    async with platform_scope(conn):
        tenant_id: str = await conn.fetchval(
            "INSERT INTO tenants (id, name, tier) VALUES ($1, $2, 'scale')"
            " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
            f"t_{uuid.uuid4().hex[:16]}", tenant_name)
        key, api_key = await insert_key(conn, tenant_id, name=key_name,
                                        role=Role.PLATFORM_ADMIN, expires_in=None,
                                        allowed_models=None)
    return tenant_id, key, api_key
