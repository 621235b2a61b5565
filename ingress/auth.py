"""Bearer credentials to a `Principal` (`topics/identity.py`): API keys checked against
PostgreSQL by SHA-256 (`state/keys.py`) and cached briefly in-process.

A cached key is re-checked at each use for what can change without the database being asked
(its expiry); what needs the database to change (a revocation, a rotation's new expiry, a
tenant's suspension) reaches every ingress through `drop_key`/`drop_tenant`/`drop_all`, fed
by the revocation broadcast (`state/revocations.py`), and otherwise within the cache's TTL
(`ingress.auth_cache_ttl_s`). Each key let through is noted for its `last_used_at`
(`state/last_used.py`), which is written in batches.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from state.keys import KeyRecord, admit_key
from state.last_used import LastUsed
from state.runtime import outage
from topics.errors import Unauthorized
from topics.identity import Principal

Lookup = Callable[[str], Awaitable[KeyRecord | None]]

log = logging.getLogger(__name__)

_MAX_CACHED = 10_000


class Authenticator:
    def __init__(self, lookup: Lookup, *, ttl_s: float, negative_ttl_s: float,
                 last_used: LastUsed | None = None) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._last_used = last_used
        # key -> (record or None, expiry). Keyed by the key itself: it never leaves the process.
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}
        # Counts the drops: a lookup that overlapped one may have read what was just
        # revoked, and must not put it back into the cache.
        self._drops = 0

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                               code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        record = await self._record(key)
        principal = admit_key(record)
        if self._last_used is not None:
            self._last_used.note(principal.key_id, principal.tenant_id)
        return principal

    async def _record(self, key: str) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            return hit[0]
        drops = self._drops
        try:
            record = await self._lookup(key)
        except Exception as exc:
            if hit is None or outage(exc) is None:
                raise
            # The database is down: a key known before keeps working (one revoked
            # meanwhile too, until the database is back); asked again shortly.
            log.warning("key lookup failed (%s); using the cached answer", exc)
            self._cache[key] = (hit[0], now + self._negative_ttl_s)
            return hit[0]
        if drops != self._drops:
            return record  # answered, not cached: it may predate the revocation
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # crude but bounded; a refill costs one query per key
        ttl = self._ttl_s if record is not None else self._negative_ttl_s
        self._cache[key] = (record, now + ttl)
        return record

    def drop_key(self, key_id: str) -> None:
        """Forget a key revoked (or changed) elsewhere: its next use asks the database."""
        self._drop(lambda record: record.key_id == key_id)

    def drop_tenant(self, tenant_id: str) -> None:
        """Forget every key of a tenant suspended or resumed elsewhere."""
        self._drop(lambda record: record.tenant_id == tenant_id)

    def drop_all(self) -> None:
        """Forget everything: revocations may have been missed (the broadcast was down)."""
        self._drops += 1
        self._cache.clear()

    def _drop(self, matches: Callable[[KeyRecord], bool]) -> None:
        self._drops += 1
        stale = [key for key, (record, _) in self._cache.items()
                 if record is not None and matches(record)]
        for key in stale:
            del self._cache[key]

