"""One reply publisher per router process. Frames for the same ingress channel that pile up
while a flush is in flight leave together: one PUBLISH carrying a JSON array of frames, all
channels in one pipeline. At low load each frame leaves alone at once; under load the number
of Redis round trips stops growing with the number of chunks. No timer, so batching never
adds latency of its own."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis.asyncio as redis

log = logging.getLogger(__name__)


class ReplyPublisher:
    def __init__(self, client: redis.Redis) -> None:
        self._redis = client
        self._pending: dict[str, list[bytes]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def publish(self, channel: str, frame: bytes) -> None:
        """Queue one encoded frame; frames of a channel keep their order."""
        self._pending.setdefault(channel, []).append(frame)
        self._wake.set()

    async def __aenter__(self) -> ReplyPublisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._task is not None:
            self._wake.set()
            await asyncio.sleep(0)  # let a last flush start
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._pending:
            await self._flush()

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._flush()
            except redis.RedisError as exc:
                # Those frames are lost; their readers see a sequence gap or their deadline
                # and fail loudly. Nothing else to do from here.
                log.warning("reply publish failed: %s", exc)

    async def _flush(self) -> None:
        batch, self._pending = self._pending, {}
        if not batch:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, frames in batch.items():
                pipe.publish(channel, frames[0] if len(frames) == 1
                             else b"[" + b",".join(frames) + b"]")
            await pipe.execute()
