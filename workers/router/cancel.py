"""Listens on the cancel channel and cancels the matching in-flight attempts. The ingress
publishes there with `publish_cancel` (`state/claims.py`), which also marks the request so
that a router that has not claimed it yet never starts it.

The subscription outlives Redis going away (`state/pubsub.py`: a lost connection or a PING
unanswered after `check_s` of silence counts as losing it; it is made again, backing off).
Pub/sub keeps nothing for an absent subscriber, so each time the channel is made again the
listener reads the cancel marks of the requests in flight (`cancelled_among`): a client
that left meanwhile still stops its attempts."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis

from state.claims import cancelled_among
from state.pubsub import Subscription
from topics import names
from topics.messages import CancelRequest

log = logging.getLogger(__name__)


class CancelListener:
    def __init__(self, client: redis.Redis, *, check_s: float = 1.0,
                 answer_s: float = 2.0) -> None:
        self._redis = client
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._subscription = Subscription(client, names.CANCEL_CHANNEL, self._cancel,
                                          check_s=check_s, answer_s=answer_s,
                                          on_subscribed=self._missed)

    @property
    def connected(self) -> bool:
        """Subscribed now: cancels published reach us."""
        return self._subscription.connected

    def register(self, request_id: str, task: asyncio.Task[None]) -> None:
        self._inflight[request_id] = task

    def unregister(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Cancel what the channel names until cancelled; subscribe again after losing it."""
        await self._subscription.run(ready)

    async def _missed(self) -> None:
        """Cancel the requests in flight whose clients left while the channel was down (on
        the first subscription there are none)."""
        if self._inflight:
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
