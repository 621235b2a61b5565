"""A Redis pub/sub subscription that is kept alive and knows when it is not.

Redis pub/sub keeps nothing for a subscriber that is away: what is published while the
subscription is down is gone. A subscriber must therefore know when it lost its subscription
(to make up for what it may have missed once it is back), and a Redis that stops answering
without closing the connection (paused, partitioned) loses nothing a socket can notice. So the
reader checks: when the channel has been silent for `check_s` it sends a PING on the
subscribed connection, and no answer within `answer_s` counts as losing it. A lost
subscription is made again, with a backoff; `on_subscribed` runs each time it is (re)made and
confirmed, before any message after it is handed over. An idle channel costs one PING per
`check_s` and is never torn down for being idle.

Used by `state/revocations.py` (every ingress and router) and the routers' cancel listener
(`workers/router/cancel.py`); `ingress/replies.py` applies the
same checks to its reply channel.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as redis

log = logging.getLogger(__name__)

_RESUBSCRIBE_FIRST_S = 0.1
_RESUBSCRIBE_MAX_S = 0.5  # the longest wait between two attempts to subscribe again

# What a lost or unanswered subscription raises.
LOST = (redis.ConnectionError, redis.TimeoutError, OSError)


class Subscription:
    def __init__(self, client: redis.Redis, channel: str, on_message: Callable[[bytes], None],
                 *, check_s: float, answer_s: float,
                 on_subscribed: Callable[[], Awaitable[None]] | None = None,
                 on_lost: Callable[[BaseException], None] | None = None) -> None:
        self._redis = client
        self.channel = channel
        self._on_message = on_message
        self._check_s = check_s
        self._answer_s = answer_s
        self._on_subscribed = on_subscribed
        self._on_lost = on_lost
        self.connected = False  # subscribed now: what is published reaches us

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Read messages until cancelled; `ready` is set once the first subscription is up.
        After a Redis error: `on_lost` (if the subscription had been up), then subscribe
        again."""
        delay_s = _RESUBSCRIBE_FIRST_S
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            watch = _Reconnects()
            try:
                await pubsub.subscribe(self.channel)
                watch.follow(pubsub)
                # SUBSCRIBE only sends: a paused Redis takes it into a socket buffer. The
                # subscription is up once Redis answers on it.
                await self._answered(pubsub)
                if self._on_subscribed is not None:
                    await self._on_subscribed()
                self.connected = True
                if ready is not None:
                    ready.set()
                delay_s = _RESUBSCRIBE_FIRST_S
                await self._read(pubsub, watch)
            except LOST as exc:
                if self.connected:
                    self.connected = False
                    log.warning("subscription to %s lost (%s); subscribing again",
                                self.channel, exc)
                    if self._on_lost is not None:
                        self._on_lost(exc)
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RESUBSCRIBE_MAX_S)
            finally:
                self.connected = False
                watch.forget()
                await close_pubsub(pubsub)

    async def _answered(self, pubsub: redis.client.PubSub) -> None:
        """Wait for the answer to a PING sent now (the subscription's confirmation comes
        before it), at most `answer_s`."""
        await pubsub.ping()
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._answer_s
        while (left := give_up - loop.time()) > 0:
            message = await pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message["type"] == "pong":
                return
            if message["type"] == "message":
                self._on_message(message["data"])
        raise redis.TimeoutError(f"no answer to SUBSCRIBE {self.channel} in "
                                 f"{self._answer_s:.1f} s")

    async def _read(self, pubsub: redis.client.PubSub, watch: _Reconnects) -> None:
        """Hand over messages until the connection fails, is made again under us, or a PING
        goes unanswered."""
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when Redis last said anything on this connection
        pinged: float | None = None  # when the unanswered PING was sent
        while True:
            wait_s = self._check_s if pinged is None else self._answer_s
            # get_message with a timeout returns None when nothing came in time; it never
            # tears the connection down for being quiet.
            message = await pubsub.get_message(timeout=wait_s)
            now = loop.time()
            if watch.happened:
                raise redis.ConnectionError(f"the connection of {self.channel} was made again "
                                            "under us; what was published meanwhile is lost")
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    self._on_message(message["data"])
                continue
            if pinged is not None:
                if now - pinged >= self._answer_s:
                    raise redis.TimeoutError(f"no answer to a PING on {self.channel} in "
                                             f"{now - pinged:.1f} s")
            elif now - heard >= self._check_s:
                await pubsub.ping()
                pinged = now


async def close_pubsub(pubsub: redis.client.PubSub) -> None:
    """`PubSub.aclose()`: typed since redis-py 8.2, untyped before; called through `Any` so
    that both type-check without an ignore that one of them would call unused."""
    close: Any = pubsub.aclose
    await close()


class _Reconnects:
    """Whether redis-py re-established a subscription's connection by itself (its retries
    reconnect and resubscribe silently): the subscription then counts as lost, since what
    was published in between is gone and `on_subscribed` must run again."""

    def __init__(self) -> None:
        self.happened = False
        self._connection: Any = None

    def follow(self, pubsub: redis.client.PubSub) -> None:
        self._connection = pubsub.connection
        if self._connection is not None:
            self._connection.register_connect_callback(self._reconnected)

    def forget(self) -> None:
        if self._connection is not None:
            self._connection.deregister_connect_callback(self._reconnected)
            self._connection = None

    def _reconnected(self, _connection: Any) -> None:
        self.happened = True
