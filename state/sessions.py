"""Revoked session tokens (`topics/sessions.py`): a logout or a refresh ends a token on every
ingress process, and checking a token costs no round trip.

`revoke` writes `sy:revoked-token:<jti>` (its value: until when it matters, unix ms; it
expires then, once the token could no longer verify anyway) and publishes the jti on
`names.REVOKED_TOKENS_CHANNEL`. Each ingress keeps the revoked ids in memory
(`RevokedTokens`): `follow` subscribes to the channel, then loads every stored revocation
(SCAN), on the first subscription and on every resubscription after Redis was lost, so one
published while the channel was down is not missed; it is known once the channel is back.

The other files of the feature: `ingress/auth.py` (`SessionVerifier`) refuses a token whose
jti is here; `ingress/sessions.py` revokes on logout and refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time

import orjson
import redis.asyncio as redis

from topics import names

log = logging.getLogger(__name__)

KEY_PREFIX = "sy:revoked-token:"
_SCAN_COUNT = 1000
_RESUBSCRIBE_MAX_S = 0.5  # the longest wait between two attempts to subscribe again
_PRUNE_AT_LEAST = 1024  # entries before the first sweep of those that no longer matter


async def revoke(client: redis.Redis, jti: str, until_s: float) -> bool:
    """End the token `jti` everywhere until `until_s` (unix seconds: its expiry plus the
    clock leeway). True if this call revoked it, False if it was revoked already: a refresh
    is single-use even when two race for the same token."""
    until_ms = max(int(until_s * 1000), int(time.time() * 1000) + 1000)
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(KEY_PREFIX + jti, until_ms, nx=True, pxat=until_ms)
        pipe.publish(names.REVOKED_TOKENS_CHANNEL,
                     orjson.dumps({"kind": "token", "jti": jti, "until_ms": until_ms}))
        stored, _ = await pipe.execute()
    return bool(stored)


class RevokedTokens:
    """The revoked token ids this process knows of, with until when each matters."""

    def __init__(self) -> None:
        self._until_ms: dict[str, int] = {}
        self._prune_at = _PRUNE_AT_LEAST
        self.connected = False  # subscribed now: revocations published reach us

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

    async def follow(self, client: redis.Redis, ready: asyncio.Event, *, check_s: float,
                     answer_s: float) -> None:
        """Keep the set current until cancelled: subscribe, load what is stored, apply what is
        published; after a Redis error, subscribe and load again. `ready` is set once the
        first load is done. A Redis that stops answering without closing the connection is
        noticed by a PING after `check_s` of silence, unanswered within `answer_s`."""
        delay_s = 0.1
        while True:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(names.REVOKED_TOKENS_CHANNEL)
                # SUBSCRIBE only sends; once Redis answers a PING after it, the channel is up
                # and loading can start: nothing published falls between the two.
                await self._confirmed(pubsub, answer_s)
                await self._load(client)
                self.connected = True
                ready.set()
                delay_s = 0.1
                await self._read(pubsub, check_s, answer_s)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self.connected:
                    log.warning("revoked-token channel lost (%s); subscribing again", exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RESUBSCRIBE_MAX_S)
            finally:
                self.connected = False
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _confirmed(self, pubsub: redis.client.PubSub, answer_s: float) -> None:
        await pubsub.ping()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + answer_s
        while (left := give_up - loop.time()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "pong":
                return
            if message["type"] == "message":
                self._apply(message["data"])
        raise redis.TimeoutError(f"no answer to SUBSCRIBE in {answer_s:.1f} s")

    async def _load(self, client: redis.Redis) -> None:
        batch: list[bytes] = []
        async for key in client.scan_iter(match=KEY_PREFIX + "*", count=_SCAN_COUNT):
            batch.append(key)
            if len(batch) >= _SCAN_COUNT:
                await self._load_batch(client, batch)
                batch = []
        if batch:
            await self._load_batch(client, batch)

    async def _load_batch(self, client: redis.Redis, keys: list[bytes]) -> None:
        prefix = len(KEY_PREFIX)
        for key, value in zip(keys, await client.mget(keys), strict=True):
            if value is not None:  # expired between SCAN and MGET
                self.add(key[prefix:].decode(), int(value))

    async def _read(self, pubsub: redis.client.PubSub, check_s: float, answer_s: float) -> None:
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when Redis last said anything on this connection
        pinged: float | None = None  # when the unanswered PING was sent
        while True:
            message = await pubsub.get_message(timeout=check_s if pinged is None else answer_s)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    self._apply(message["data"])
                continue
            if pinged is not None:
                if now - pinged >= answer_s:
                    raise redis.TimeoutError(f"no answer to a PING on the revoked-token "
                                             f"channel in {now - pinged:.1f} s")
            elif now - heard >= check_s:
                await pubsub.ping()
                pinged = now

    def _apply(self, raw: bytes) -> None:
        try:
            message = orjson.loads(raw)
            jti, until_ms = message["jti"], message["until_ms"]
            if not isinstance(jti, str) or not isinstance(until_ms, int):
                raise TypeError("jti must be a string and until_ms an integer")
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            log.warning("dropped a malformed revocation message: %s", exc)
            return
        self.add(jti, until_ms)
