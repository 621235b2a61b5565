"""Bearer API keys, checked against PostgreSQL by SHA-256 and cached briefly in-process."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from state.keys import KeyOwner
from state.runtime import outage
from topics.errors import Unauthorized

Lookup = Callable[[str], Awaitable[KeyOwner | None]]

log = logging.getLogger(__name__)

_MAX_CACHED = 10_000


class Authenticator:
    def __init__(self, lookup: Lookup, *, ttl_s: float, negative_ttl_s: float) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        # key -> (owner or None, expiry). Keyed by the key itself: it never leaves the process.
        self._cache: dict[str, tuple[KeyOwner | None, float]] = {}

    async def authenticate(self, authorization: str | None) -> KeyOwner:
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'",
                               code="missing_api_key")
        scheme, _, key = authorization.partition(" ")
        key = key.strip()
        if scheme.lower() != "bearer" or not key:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[1] > now:
            owner = hit[0]
        else:
            try:
                owner = await self._lookup(key)
            except Exception as exc:
                if hit is None or outage(exc) is None:
                    raise
                # The database is down: a key known before keeps working (one revoked
                # meanwhile too, until the database is back); asked again shortly.
                log.warning("key lookup failed (%s); using the cached answer", exc)
                owner = hit[0]
                self._cache[key] = (owner, now + self._negative_ttl_s)
                return _known(owner)
            if len(self._cache) >= _MAX_CACHED:
                self._cache.clear()  # crude but bounded; a refill costs one query per key
            ttl = self._ttl_s if owner is not None else self._negative_ttl_s
            self._cache[key] = (owner, now + ttl)
        return _known(owner)


def _known(owner: KeyOwner | None) -> KeyOwner:
    if owner is None:
        raise Unauthorized("invalid API key")
    return owner
