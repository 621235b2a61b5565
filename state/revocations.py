"""Revocations broadcast to every ingress and router, so that a credential stops working
everywhere within moments instead of when each process's cache happens to expire.

What is revoked lives where it is decided: a key's `revoked_at` or `expires_at` and a
tenant's suspension in PostgreSQL (`state/keys.py`, `state/tenants.py`), a session token's
revocation in Redis (below). The broadcast only tells the processes' caches to forget what
they hold, so that the next use reads the truth again.

The interface:

- `publish_revocation(redis, kind, id, expires_at_ms=None)`, called after the change is
  stored. `kind` is `"key"` (a key revoked, or changed: a rotation sets its expiry),
  `"tenant"` (suspended or resumed) or `"token"` (a session token logged out).
  A token revocation must carry the token's own expiry (`expires_at_ms`, unix ms): it is
  also kept in Redis, in the sorted set `revoked:tokens` (member: the token id, score: its
  expiry), until the token would have expired anyway, so that a process that starts (or
  subscribes again) later still knows it.
- `revoked_tokens(redis)`: the token revocations still in force, `{token id: expiry ms}`.
- `RevocationListener(redis, caches, on_token=..., check_s=..., answer_s=...)`, run as a
  task by each process's lifespan. Each cache is a `Revocable`: `drop_key(key_id)`,
  `drop_tenant(tenant_id)`, `drop_all()` (the ingress's `Authenticator`, a router's
  `AccessCheck`). A token revocation goes to the optional `on_token(token_id,
  expires_at_ms)` (the ingress's session verifier). The subscription is checked and made
  again when lost (`state/pubsub.py`); each time it is (re)made, every cache is told
  `drop_all()` and `on_token` is fed `revoked_tokens()`, because what was published while
  it was down is lost.

The bound this gives: a revocation takes effect at once on every process that hears the
broadcast; a process that does not (its subscription down, Redis unreachable) stops
honouring a key within its cache's TTL (`ingress.auth_cache_ttl_s`,
`router.key_cache_ttl_s`) anyway, and forgets everything the moment its subscription is
back. The message is `topics/messages.py` `Revocation`, on channel
`topics/names.py` `REVOCATIONS_CHANNEL`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol, cast

import redis.asyncio as redis
from pydantic import ValidationError

from state.pubsub import Subscription
from topics.messages import Revocation, RevocationKind
from topics.names import REVOCATIONS_CHANNEL

log = logging.getLogger(__name__)

TOKENS_KEY = "revoked:tokens"  # sorted set: revoked token id -> the token's expiry (unix ms)

TokenCallback = Callable[[str, int], None]


class Revocable(Protocol):
    """A process-local cache of credentials that a revocation must reach."""

    def drop_key(self, key_id: str) -> None: ...

    def drop_tenant(self, tenant_id: str) -> None: ...

    def drop_all(self) -> None: ...


def _now_ms() -> int:
    return int(time.time() * 1000)


async def publish_revocation(client: redis.Redis, kind: RevocationKind, id: str,
                             expires_at_ms: int | None = None) -> bool:
    """Tell every ingress and router that `id` (a key, tenant or token) changed. Call it
    after the change is stored. Raises a Redis error when Redis is unreachable: the
    change still holds everywhere within the caches' TTL. For a token: True if this call
    revoked it, False if it was revoked already (a refresh is single-use even when two
    race); True for the other kinds."""
    message = Revocation(kind=kind, id=id, expires_at_ms=expires_at_ms)  # checks the pair
    async with client.pipeline(transaction=True) as pipe:
        if message.expires_at_ms is not None:
            pipe.zadd(TOKENS_KEY, {id: message.expires_at_ms}, nx=True)
            # Pruned here, by the writers: the set holds only tokens that could still be used.
            pipe.zremrangebyscore(TOKENS_KEY, "-inf", _now_ms())
        pipe.publish(REVOCATIONS_CHANNEL, message.to_json())
        replies = await pipe.execute()
    return message.expires_at_ms is None or bool(replies[0])


async def revoked_tokens(client: redis.Redis) -> dict[str, int]:
    """The revoked tokens that have not expired yet: {token id: its expiry (unix ms)}."""
    found = await client.zrangebyscore(TOKENS_KEY, f"({_now_ms()}", "+inf", withscores=True)
    revoked: dict[str, int] = {}
    for member, score in cast(list[tuple[bytes, float]], found):
        revoked[member.decode()] = int(score)
    return revoked


class RevocationListener:
    def __init__(self, client: redis.Redis, caches: Sequence[Revocable], *,
                 on_token: TokenCallback | None = None, check_s: float,
                 answer_s: float) -> None:
        self._redis = client
        self._caches = tuple(caches)
        self._on_token = on_token
        self._subscription = Subscription(client, REVOCATIONS_CHANNEL, self._received,
                                          check_s=check_s, answer_s=answer_s,
                                          on_subscribed=self._subscribed)

    @property
    def connected(self) -> bool:
        return self._subscription.connected

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Listen until cancelled, subscribing again whenever the subscription is lost."""
        await self._subscription.run(ready)

    async def _subscribed(self) -> None:
        # Whatever was published before this subscription was up is unknown: forget it all.
        for cache in self._caches:
            cache.drop_all()
        if self._on_token is not None:
            for token_id, expires_at_ms in (await revoked_tokens(self._redis)).items():
                self._on_token(token_id, expires_at_ms)

    def _received(self, raw: bytes) -> None:
        try:
            revocation = Revocation.from_json(raw)
        except ValidationError as exc:
            # It may have been a revocation of a newer shape: forgetting everything costs a
            # few reads, missing it could keep a revoked key working.
            log.warning("unreadable revocation message (%s); dropping every cached key",
                        exc.errors(include_input=False)[0]["msg"])
            for cache in self._caches:
                cache.drop_all()
            return
        if revocation.kind == "token":
            if self._on_token is not None and revocation.expires_at_ms is not None:
                self._on_token(revocation.id, revocation.expires_at_ms)
            return
        for cache in self._caches:
            if revocation.kind == "key":
                cache.drop_key(revocation.id)
            else:
                cache.drop_tenant(revocation.id)
