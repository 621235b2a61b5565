"""Listens on the cancel channel and cancels the matching in-flight attempts. The ingress
publishes there with `publish_cancel` (`state/claims.py`), which also marks the request so
that a router that has not claimed it yet never starts it."""

from __future__ import annotations

import asyncio
import logging

import redis.asyncio as redis

from topics import names
from topics.messages import CancelRequest

log = logging.getLogger(__name__)


class CancelListener:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._inflight: dict[str, asyncio.Task[None]] = {}

    def register(self, request_id: str, task: asyncio.Task[None]) -> None:
        self._inflight[request_id] = task

    def unregister(self, request_id: str) -> None:
        self._inflight.pop(request_id, None)

    async def run(self, ready: asyncio.Event | None = None) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        await pubsub.subscribe(names.CANCEL_CHANNEL)
        if ready is not None:
            ready.set()
        try:
            async for message in pubsub.listen():
                try:
                    cancel = CancelRequest.from_json(message["data"])
                except ValueError:
                    log.warning("ignored malformed cancel message")
                    continue
                task = self._inflight.get(cancel.request_id)
                if task is not None and not task.done():
                    log.info("cancelling %s: %s", cancel.request_id, cancel.reason)
                    task.cancel()
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]
