"""The router's re-check of a request's API key and tenant, before anything runs.

Requests reach `llm.requests` from the ingress, which authenticated them, and from batch
producers, which publish envelopes straight to Kafka with the `tenant_id` and `key_id` they
act for. Either way, the key may have been revoked, have expired or lost its tenant to a
suspension since: the router checks each request it claimed against PostgreSQL
(`state/keys.py` `key_status`, in the tenant's scope) with the same rule as the ingress
(`admit_key`), then the role (`inference`) and the models the key is limited to. A refusal
is the request's answer (`401 invalid_api_key`, `key_revoked` or `key_expired`, 403
`tenant_suspended`, `permission_denied` or `model_not_allowed`): no provider is called.

What a key's check read is cached per (tenant, key) for `router.key_cache_ttl_s`, so the
hot path makes no round trip while it is cached; the revocation broadcast
(`state/revocations.py`) drops it at once. While PostgreSQL is unreachable, a key read
before keeps its last known state (`state/cache.py`); a key never read fails the request
with 503 `database_unavailable`.
"""

from __future__ import annotations

import asyncpg

from state.cache import ReadThroughCache
from state.keys import KeyRecord, admit_key, key_status
from topics.identity import Permission, Principal
from topics.messages import RequestEnvelope
from topics.routing_policy import AUTO

_CacheKey = tuple[str, str]  # (tenant id, key id)


class AccessCheck:
    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float, max_entries: int = 10_000) -> None:
        async def load(which: _CacheKey) -> KeyRecord | None:
            return await key_status(pool, *which)

        self._cache: ReadThroughCache[_CacheKey, KeyRecord | None] = ReadThroughCache(
            load, ttl_s=ttl_s, max_entries=max_entries)

    async def check(self, env: RequestEnvelope) -> Principal:
        """The request's principal, or the 401/403 the request is answered with."""
        principal = admit_key(await self._cache.get((env.tenant_id, env.key_id)))
        principal.require(Permission.INFERENCE)
        if principal.allowed_models is not None:
            model = str(env.body.get("model"))
            if model != AUTO:  # "auto" chooses among the key's models (decide.py)
                principal.require_model(model)
            for name in env.routing.fallbacks or ():
                principal.require_model(name)
        return principal

    # The revocation broadcast's hooks (state/revocations.py `Revocable`).
    def drop_key(self, key_id: str) -> None:
        self._cache.invalidate_where(lambda which: which[1] == key_id)

    def drop_tenant(self, tenant_id: str) -> None:
        self._cache.invalidate_where(lambda which: which[0] == tenant_id)

    def drop_all(self) -> None:
        self._cache.clear()
