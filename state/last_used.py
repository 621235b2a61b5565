"""`api_keys.last_used_at`, written in batches: never a database write per request.

The ingress's `Authenticator` (`ingress/auth.py`) notes each key it lets through with the
time (`note`, a dict write); a task of the ingress's lifespan calls `flush` every
`ingress.last_used_flush_s`, which writes every key noted since in one statement per tenant
(in that tenant's `tenant_scope`), and once more when the process stops.

Resolution: the time written is the key's last use as this process saw it, exact to the
request; it reaches the database within one flush interval. Several ingresses may flush the
same key: the latest time wins (the statement never moves `last_used_at` back). While
PostgreSQL is unreachable, a failed flush keeps what it could not write, merged with the
newer uses, and tries again at the next interval; what is held stays bounded (`max_keys`
keys: past it, further keys are not noted until a flush succeeds).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

import asyncpg

from state.runtime import outage
from state.tenancy import tenant_scope

log = logging.getLogger(__name__)


class LastUsed:
    def __init__(self, *, max_keys: int = 100_000) -> None:
        self._max_keys = max_keys
        self._used: dict[str, tuple[str, float]] = {}  # key id -> (tenant id, unix seconds)

    def note(self, key_id: str, tenant_id: str) -> None:
        """Key `key_id` was used now."""
        if len(self._used) < self._max_keys or key_id in self._used:
            self._used[key_id] = (tenant_id, time.time())

    async def flush(self, pool: asyncpg.Pool) -> int:
        """Write what was noted; returns the keys written. On an outage of the database what
        was not written is kept for the next flush (the error is logged, not raised)."""
        taken, self._used = self._used, {}
        by_tenant: dict[str, dict[str, float]] = defaultdict(dict)
        for key_id, (tenant_id, at) in taken.items():
            by_tenant[tenant_id][key_id] = at
        written = 0
        pending = list(by_tenant.items())
        for i, (tenant_id, keys) in enumerate(pending):
            try:
                async with tenant_scope(pool, tenant_id) as conn:
                    await conn.execute(
                        "UPDATE api_keys k SET last_used_at = to_timestamp(u.at)"
                        " FROM unnest($2::text[], $3::float8[]) AS u(id, at)"
                        " WHERE k.id = u.id AND k.tenant_id = $1"
                        " AND (k.last_used_at IS NULL OR k.last_used_at < to_timestamp(u.at))",
                        tenant_id, list(keys), list(keys.values()))
            except Exception as exc:
                if outage(exc) is None:
                    raise
                # The database is down: the other tenants' writes would wait as long.
                for later_tenant, later_keys in pending[i:]:
                    self._keep(later_tenant, later_keys)
                log.warning("last_used_at not written for %d keys (%s); kept for the next "
                            "flush", len(taken) - written, type(exc).__name__)
                break
            written += len(keys)
        return written

    def _keep(self, tenant_id: str, keys: dict[str, float]) -> None:
        for key_id, at in keys.items():
            newer = self._used.get(key_id)
            if newer is None and len(self._used) >= self._max_keys:
                continue  # bounded: the oldest news is what goes
            if newer is None or newer[1] < at:
                self._used[key_id] = (tenant_id, at)

    async def run(self, pool: asyncpg.Pool, every_s: float) -> None:
        """Flush every `every_s` until cancelled."""
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.flush(pool)
            except Exception:
                log.exception("last_used_at flush failed")  # a bug; the next one tries again
