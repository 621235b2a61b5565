"""Tenants and API keys. A key is shown once at creation; only its SHA-256 is stored.

`ingress/auth.py` checks bearer keys against them (cached briefly) and turns a key into the
request's `Principal` (`topics/identity.py`), and a session token into the record of the key
it was opened with (`find_key_by_id`); `compose/cli.py` (`switchyard keys create`)
creates them."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from topics.identity import Principal, Role

KEY_PREFIX = "sy-"


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key that is not revoked, as authentication needs it: whether it may still be used
    (expiry, the tenant's suspension) is decided at each use, since the record is cached."""

    key_id: str
    tenant_id: str
    role: Role
    allowed_models: frozenset[str] | None
    expires_at: datetime | None
    tenant_suspended: bool

    def principal(self) -> Principal:
        return Principal(tenant_id=self.tenant_id, key_id=self.key_id, role=self.role,
                         allowed_models=self.allowed_models)


def hash_key(api_key: str) -> bytes:
    return hashlib.sha256(api_key.encode()).digest()


def new_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


async def ensure_tenant(conn: asyncpg.Connection | asyncpg.Pool, name: str) -> str:
    """The id of the tenant called `name`, created if missing."""
    row = await conn.fetchrow(
        "INSERT INTO tenants (id, name) VALUES ($1, $2)"
        " ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name RETURNING id",
        f"t_{uuid.uuid4().hex[:16]}",
        name,
    )
    assert row is not None
    return str(row["id"])


async def store_key(conn: asyncpg.Connection | asyncpg.Pool, tenant_id: str, api_key: str) -> str:
    """Store the hash of `api_key` for the tenant (idempotent); returns the key id."""
    row = await conn.fetchrow(
        "INSERT INTO api_keys (id, tenant_id, key_sha256, prefix) VALUES ($1, $2, $3, $4)"
        " ON CONFLICT (key_sha256) DO UPDATE SET revoked_at = NULL RETURNING id, tenant_id",
        f"k_{uuid.uuid4().hex[:16]}",
        tenant_id,
        hash_key(api_key),
        api_key[:8],
    )
    assert row is not None
    if row["tenant_id"] != tenant_id:
        raise ValueError("that API key already belongs to another tenant")
    return str(row["id"])


async def create_key(conn: asyncpg.Connection | asyncpg.Pool, tenant_name: str) -> tuple[str, str]:
    """A new key for the tenant (created if missing). Returns (key id, the key itself)."""
    tenant_id = await ensure_tenant(conn, tenant_name)
    api_key = new_api_key()
    return await store_key(conn, tenant_id, api_key), api_key


_RECORD_QUERY = (
    "SELECT k.id, k.tenant_id, k.role, k.allowed_models, k.expires_at, t.status"
    " FROM api_keys k JOIN tenants t ON t.id = k.tenant_id"
    " WHERE k.revoked_at IS NULL AND ")


async def find_key(pool: asyncpg.Pool, api_key: str) -> KeyRecord | None:
    """The key's record, or None when no such key exists or it was revoked."""
    return _record(await pool.fetchrow(_RECORD_QUERY + "k.key_sha256 = $1", hash_key(api_key)))


async def find_key_by_id(pool: asyncpg.Pool, key_id: str) -> KeyRecord | None:
    """The record of the key with this id (what a session token names, `topics/sessions.py`),
    or None when no such key exists or it was revoked."""
    return _record(await pool.fetchrow(_RECORD_QUERY + "k.id = $1", key_id))


def _record(row: asyncpg.Record | None) -> KeyRecord | None:
    if row is None:
        return None
    models = row["allowed_models"]
    return KeyRecord(key_id=row["id"], tenant_id=row["tenant_id"], role=Role(row["role"]),
                     allowed_models=None if models is None else frozenset(models),
                     expires_at=row["expires_at"], tenant_suspended=row["status"] != "active")
