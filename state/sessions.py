"""Revoked session tokens (`topics/sessions.py`): a logout or a refresh ends a token on every
ingress process, and checking a token costs no round trip.

`revoke` is a token revocation of the one revocation broadcast (`state/revocations.py`): the
token id is kept in Redis until the token would have expired anyway, and published. Each
ingress keeps the revoked ids in memory (`RevokedTokens`), fed by its `RevocationListener`
(`on_token`): every stored revocation on each (re)subscription, so one published while the
channel was down is not missed, then each one as it is published.

The other files of the feature: `ingress/auth.py` (`SessionVerifier`) refuses a token whose
id is here; `ingress/sessions.py` revokes on logout and refresh.
"""

from __future__ import annotations

import time

import redis.asyncio as redis

from state.revocations import publish_revocation

_PRUNE_AT_LEAST = 1024  # entries before the first sweep of those that no longer matter


async def revoke(client: redis.Redis, jti: str, until_s: float) -> bool:
    """End the token `jti` everywhere until `until_s` (unix seconds: its expiry plus the
    clock leeway). True if this call revoked it, False if it was revoked already: a refresh
    is single-use even when two race for the same token."""
    until_ms = max(int(until_s * 1000), int(time.time() * 1000) + 1000)
    return await publish_revocation(client, "token", jti, until_ms)


class RevokedTokens:
    """The revoked token ids this process knows of, with until when each matters."""

    def __init__(self) -> None:
        self._until_ms: dict[str, int] = {}
        self._prune_at = _PRUNE_AT_LEAST

    def __contains__(self, jti: str) -> bool:
        return jti in self._until_ms

    def __len__(self) -> int:
        return len(self._until_ms)

    def add(self, jti: str, until_ms: int) -> None:
        self._until_ms[jti] = until_ms
        if len(self._until_ms) >= self._prune_at:
            # A token past its expiry fails verification anyway: its id can go.
            now_ms = int(time.time() * 1000)
            self._until_ms = {j: u for j, u in self._until_ms.items() if u > now_ms}
            self._prune_at = max(_PRUNE_AT_LEAST, 2 * len(self._until_ms))
