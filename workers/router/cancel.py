"""Listens on the cancel channel and cancels the matching in-flight attempts. The ingress
publishes there with `publish_cancel` (`state/claims.py`), which also marks the request so
that a router that has not claimed it yet never starts it.

The subscription outlives Redis going away. A closed connection (Redis killed or restarted)
raises, and the listener subscribes again, backing off up to half a second. A Redis that
stops answering without closing the connection (paused, partitioned) is noticed as
`ingress/replies.py` notices it: after `check_s` of silence a PING goes out on the subscribed
connection, and no answer within `answer_s` counts as losing the channel. Pub/sub keeps
nothing for an absent subscriber, so once subscribed again the listener reads the cancel
marks of the requests in flight (`cancelled_among`): a client that left meanwhile still
stops its attempts."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis

from state.claims import cancelled_among
from topics import names
from topics.messages import CancelRequest

log = logging.getLogger(__name__)

_RESUBSCRIBE_MAX_S = 0.5  # the longest wait between two attempts to subscribe again


class CancelListener:
    def __init__(self, client: redis.Redis, *, check_s: float = 1.0,
                 answer_s: float = 2.0) -> None:
        self._redis = client
        self._check_s = check_s
        self._answer_s = answer_s
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self.connected = False  # subscribed now: cancels published reach us

    def register(self, request_id: str, task: asyncio.Task[None]) -> None:
        self._inflight[request_id] = task

    def unregister(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Cancel what the channel names until cancelled; subscribe again after losing it."""
        delay_s = 0.1
        lost = False  # the channel was lost: cancels may have been missed
        while True:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(names.CANCEL_CHANNEL)
                # SUBSCRIBE only sends: a paused Redis takes it into a socket buffer. The
                # channel is up once Redis answers on it.
                await self._answered(pubsub)
                self.connected = True
                if ready is not None:
                    ready.set()
                delay_s = 0.1
                if lost:
                    await self._missed()
                    lost = False
                await self._read(pubsub)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
                if self.connected:
                    log.warning("cancel channel lost (%s); resubscribing", exc)
                lost = True
                self.connected = False
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, _RESUBSCRIBE_MAX_S)
            finally:
                self.connected = False
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _answered(self, pubsub: redis.client.PubSub) -> None:
        """Wait for the answer to a PING sent now, at most `answer_s`."""
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
                self._cancel(message["data"])
        raise redis.TimeoutError(f"no answer to SUBSCRIBE in {self._answer_s:.1f} s")

    async def _read(self, pubsub: redis.client.PubSub) -> None:
        """Act on messages until the connection fails or a PING goes unanswered."""
        loop = asyncio.get_running_loop()
        heard = loop.time()  # when Redis last said anything on this connection
        pinged: float | None = None  # when the unanswered PING was sent
        while True:
            wait_s = self._check_s if pinged is None else self._answer_s
            # get_message with a timeout returns None when nothing came in time; it never
            # tears the connection down for being quiet.
            message = await pubsub.get_message(timeout=wait_s)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                if message["type"] == "message":
                    self._cancel(message["data"])
                continue
            if pinged is not None:
                if now - pinged >= self._answer_s:
                    raise redis.TimeoutError(
                        f"no answer to a PING on the cancel channel in {now - pinged:.1f} s")
            elif now - heard >= self._check_s:
                await pubsub.ping()
                pinged = now

    async def _missed(self) -> None:
        """Cancel the requests in flight whose clients left while the channel was down."""
        for request_id in await cancelled_among(self._redis, list(self._inflight)):
            self._stop(request_id, "cancelled while the cancel channel was down")

    def _cancel(self, raw: bytes) -> None:
        try:
            cancel = CancelRequest.from_json(raw)
        except ValueError:
            log.warning("ignored malformed cancel message")
            return
        self._stop(cancel.request_id, cancel.reason)

    def _stop(self, request_id: str, reason: str) -> None:
        task = self._inflight.get(request_id)
        if task is not None and not task.done():
            log.info("cancelling %s: %s", request_id, reason)
            task.cancel()
