"""Tenants' routing policies in PostgreSQL (`routing_policies`), and the router's cached reader.

No row means the default policy, `RoutingPolicy()`. A stored row that no longer validates
(written by a newer version, or edited by hand) is an error, never the default: falling back
would silently lift the tenant's provider and price restrictions.

The other files of the feature: `topics/routing_policy.py` is the policy's model and its
eligibility rules; `ingress/routing_policy.py` serves GET, PUT and DELETE
/v1/routing/policy; `workers/router/decide.py` reads policies through `PolicyCache`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import asyncpg
import orjson
from pydantic import ValidationError

from state.cache import ReadThroughCache
from state.tenancy import tenant_scope
from topics.errors import SwitchyardError
from topics.routing_policy import RoutingPolicy

Source = Literal["stored", "default"]


@dataclass(frozen=True, slots=True)
class EffectivePolicy:
    """The policy that applies to a tenant, and whether it is stored or the default."""

    policy: RoutingPolicy
    source: Source
    updated_at: datetime | None  # None for the default


def _decode(tenant_id: str, raw: str) -> RoutingPolicy:
    try:
        return RoutingPolicy.model_validate(orjson.loads(raw))
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "policy"
        raise SwitchyardError(
            f"the stored routing policy of tenant {tenant_id!r} is not valid ({where}: "
            f"{first['msg']}); PUT or DELETE /v1/routing/policy replaces it",
            code="routing_policy_unreadable") from None


async def read_policy(pool: asyncpg.Pool, tenant_id: str) -> EffectivePolicy:
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "SELECT policy, updated_at FROM routing_policies WHERE tenant_id = $1", tenant_id)
    if row is None:
        return EffectivePolicy(RoutingPolicy(), "default", None)
    return EffectivePolicy(_decode(tenant_id, row["policy"]), "stored", row["updated_at"])


async def get_policy(pool: asyncpg.Pool, tenant_id: str) -> RoutingPolicy:
    """The tenant's policy: the stored one, else the default."""
    return (await read_policy(pool, tenant_id)).policy


async def put_policy(pool: asyncpg.Pool, tenant_id: str,
                     policy: RoutingPolicy) -> EffectivePolicy:
    """Store `policy` as the tenant's, replacing any earlier one. Check it against the
    catalog first (`validate_against`): this stores whatever it is given."""
    async with tenant_scope(pool, tenant_id) as conn:
        updated_at: datetime = await conn.fetchval(
            "INSERT INTO routing_policies (tenant_id, policy) VALUES ($1, $2::jsonb)"
            " ON CONFLICT (tenant_id) DO UPDATE SET policy = EXCLUDED.policy,"
            " updated_at = now() RETURNING updated_at",
            tenant_id, orjson.dumps(policy.public()).decode())
    return EffectivePolicy(policy, "stored", updated_at)


async def delete_policy(pool: asyncpg.Pool, tenant_id: str) -> bool:
    """Back to the default policy; whether a stored one was deleted."""
    async with tenant_scope(pool, tenant_id) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM routing_policies WHERE tenant_id = $1 RETURNING tenant_id", tenant_id)
    return deleted is not None


class PolicyCache:
    """The router's reader: a tenant's policy (the default too), cached in-process for
    `ttl_s`, concurrent misses sharing one read (see `ReadThroughCache`)."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float, *, max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        async def load(tenant_id: str) -> RoutingPolicy:
            return await get_policy(pool, tenant_id)

        self._cache: ReadThroughCache[str, RoutingPolicy] = ReadThroughCache(
            load, ttl_s=ttl_s, max_entries=max_entries, clock=clock)

    async def policy_for(self, tenant_id: str) -> RoutingPolicy:
        return await self._cache.get(tenant_id)

    def invalidate(self, tenant_id: str) -> None:
        self._cache.invalidate(tenant_id)
