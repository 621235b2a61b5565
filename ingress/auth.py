"""Bearer credentials to a `Principal` (`topics/identity.py`): API keys checked against
PostgreSQL by SHA-256 (`state/keys.py`) and cached briefly in-process; session tokens
(`topics/sessions.py`, issued by `ingress/sessions.py`) verified in-process by a
`SessionVerifier`, which checks the record of the key the session was opened with.

A credential starting with `sy-` is an API key; one shaped like a JWT (three base64url
segments) is a session token; anything else is tried as an API key (keys stored by hand).

A cached key is re-checked at each use for what can change without the database being asked
(its expiry); what needs the database to change (a revocation, a rotation's new expiry, a
tenant's suspension) reaches every ingress through `drop_key`/`drop_tenant`/`drop_all`, fed
by the revocation broadcast (`state/revocations.py`), and otherwise within the cache's TTL
(`ingress.auth_cache_ttl_s`). A session's key goes through the same checks (`admit_key`), from
a cache of its own keyed by (tenant, key id). Neither path costs a round trip per request while
its cache holds: a logged-out token is known from the in-memory set the broadcast keeps
current (`state/sessions.py`), and a token's signature is checked at its first use in the
process only (its expiry at every use). Each key let through is noted for its `last_used_at`
(`state/last_used.py`), which is written in batches.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from state.keys import KEY_PREFIX, KeyRecord, admit_key
from state.last_used import LastUsed
from state.runtime import outage
from state.sessions import RevokedTokens
from topics.errors import Unauthorized
from topics.identity import Principal
from topics.sessions import SessionClaims, SessionCodec, invalid_token, token_expired

K = TypeVar("K", bound=Hashable)

Lookup = Callable[[str], Awaitable[KeyRecord | None]]
# A session's key: (tenant id, key id) -> its record, revoked or not.
LookupById = Callable[[tuple[str, str]], Awaitable[KeyRecord | None]]

log = logging.getLogger(__name__)

_MAX_CACHED = 10_000
# Three base64url segments; the last may be empty (an unsigned token, refused as invalid).
_JWT_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")


class _RecordCache(Generic[K]):
    """Key records by a lookup value (the key itself, or a session's tenant and key id), each
    for `ttl_s`; an unknown one for `negative_ttl_s`. While the database is down, a record
    known before is served (and asked for again shortly)."""

    def __init__(self, lookup: Callable[[K], Awaitable[KeyRecord | None]], *, ttl_s: float,
                 negative_ttl_s: float) -> None:
        self._lookup = lookup
        self._ttl_s = ttl_s
        self._negative_ttl_s = negative_ttl_s
        # Keyed by the key itself for API keys: it never leaves the process.
        self._cache: dict[K, tuple[KeyRecord | None, float]] = {}
        # Counts the drops: a lookup that overlapped one may have read what was just
        # revoked, and must not put it back into the cache.
        self._drops = 0

    async def get(self, value: K) -> KeyRecord | None:
        now = time.monotonic()
        hit = self._cache.get(value)
        if hit is not None and hit[1] > now:
            return hit[0]
        drops = self._drops
        try:
            record = await self._lookup(value)
        except Exception as exc:
            if hit is None or outage(exc) is None:
                raise
            # The database is down: a key known before keeps working (one revoked
            # meanwhile too, until the database is back); asked again shortly.
            log.warning("key lookup failed (%s); using the cached answer", exc)
            self._cache[value] = (hit[0], now + self._negative_ttl_s)
            return hit[0]
        if drops != self._drops:
            return record  # answered, not cached: it may predate the revocation
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()  # crude but bounded; a refill costs one query per key
        ttl = self._ttl_s if record is not None else self._negative_ttl_s
        self._cache[value] = (record, now + ttl)
        return record

    def drop(self, matches: Callable[[KeyRecord], bool]) -> None:
        self._drops += 1
        stale = [value for value, (record, _) in self._cache.items()
                 if record is not None and matches(record)]
        for value in stale:
            del self._cache[value]

    def clear(self) -> None:
        self._drops += 1
        self._cache.clear()


class SessionVerifier:
    """Session tokens to a principal: the token's signature and claims (`SessionCodec`), its
    id against the revoked ones (`RevokedTokens`, kept current by the broadcast), then the
    current record of the key it names, through a cache keyed by (tenant, key id).

    The principal is the key's as it is now (role, allowed models), not as the token says
    it was at login: a key's role lowered, the key revoked or expired, or its tenant
    suspended, holds for its sessions as for the key."""

    def __init__(self, codec: SessionCodec, revoked: RevokedTokens, lookup_by_id: LookupById,
                 *, ttl_s: float, negative_ttl_s: float) -> None:
        self.codec = codec
        self.revoked = revoked
        self._keys: _RecordCache[tuple[str, str]] = _RecordCache(
            lookup_by_id, ttl_s=ttl_s, negative_ttl_s=negative_ttl_s)
        # Tokens that verified, by the token itself: what verification found cannot change
        # while the process's signing keys do not, so the signature is checked once per
        # token, its expiry and revocation at every use. Only valid tokens get in.
        self._verified: dict[str, SessionClaims] = {}

    async def verify(self, token: str) -> Principal:
        claims = self.claims(token)
        record = await self.usable_record(claims)
        return Principal(tenant_id=record.tenant_id, key_id=record.key_id, role=record.role,
                         allowed_models=record.allowed_models, session_id=claims.jti)

    def claims(self, token: str) -> SessionClaims:
        """The token's claims if it verifies and was not revoked; no I/O."""
        claims = self._verified.get(token)
        if claims is None:
            claims = self.codec.verify(token)
            if len(self._verified) >= _MAX_CACHED:
                self._verified.clear()  # bounded; a refill costs one verification per token
            self._verified[token] = claims
        elif self.codec.expired(claims):
            del self._verified[token]
            raise token_expired()
        if claims.jti in self.revoked:
            raise Unauthorized("this session token was logged out (or replaced by a refresh): "
                               "log in again", code="token_revoked")
        return claims

    async def usable_record(self, claims: SessionClaims) -> KeyRecord:
        """The current record of the key the session was opened with, if that key may be
        used now (`admit_key`)."""
        record = await self._keys.get((claims.tenant_id, claims.key_id))
        if record is None:
            raise Unauthorized("the API key this session was opened with no longer exists",
                               code="invalid_api_key")
        admit_key(record)
        return record

    def drop(self, matches: Callable[[KeyRecord], bool]) -> None:
        self._keys.drop(matches)

    def drop_all(self) -> None:
        self._keys.clear()


class Authenticator:
    def __init__(self, lookup: Lookup, *, ttl_s: float, negative_ttl_s: float,
                 last_used: LastUsed | None = None,
                 sessions: SessionVerifier | None = None) -> None:
        self._keys: _RecordCache[str] = _RecordCache(lookup, ttl_s=ttl_s,
                                                     negative_ttl_s=negative_ttl_s)
        self._last_used = last_used
        self._sessions = sessions  # None: no signing key configured, no session accepted

    async def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise Unauthorized("missing API key: send 'Authorization: Bearer <key>' (or "
                               "'x-api-key: <key>')",
                               code="missing_api_key")
        scheme, _, credential = authorization.partition(" ")
        credential = credential.strip()
        if scheme.lower() != "bearer" or not credential:
            raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
        if not credential.startswith(KEY_PREFIX) and _JWT_SHAPE.fullmatch(credential):
            if self._sessions is None:
                raise invalid_token("sessions are not configured on this gateway")
            principal = await self._sessions.verify(credential)
        else:
            principal = admit_key(await self._keys.get(credential))
        if self._last_used is not None:
            self._last_used.note(principal.key_id, principal.tenant_id)
        return principal

    async def api_key_record(self, api_key: str) -> KeyRecord:
        """The usable record of an API key sent other than as a bearer (the body of `POST
        /v1/auth/login`): the same lookup, cache and checks as `authenticate`."""
        record = await self._keys.get(api_key)
        admit_key(record)
        assert record is not None  # admit_key refuses None
        return record

    def drop_key(self, key_id: str) -> None:
        """Forget a key revoked (or changed) elsewhere: its next use asks the database."""
        self._drop(lambda record: record.key_id == key_id)

    def drop_tenant(self, tenant_id: str) -> None:
        """Forget every key of a tenant suspended or resumed elsewhere."""
        self._drop(lambda record: record.tenant_id == tenant_id)

    def drop_all(self) -> None:
        """Forget everything: revocations may have been missed (the broadcast was down)."""
        self._keys.clear()
        if self._sessions is not None:
            self._sessions.drop_all()

    def _drop(self, matches: Callable[[KeyRecord], bool]) -> None:
        self._keys.drop(matches)
        if self._sessions is not None:
            self._sessions.drop(matches)
