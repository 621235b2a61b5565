"""One reply publisher per router process. Frames for the same ingress channel that pile up
before a flush leave together: one PUBLISH carrying the encoded frames back to back
(`topics.messages.encode_frame`), all channels in one pipeline, so the number of Redis writes
stops growing with the number of chunks.

What the client waits for (a request's meta, first chunk, done, error) is flushed at once.
Follow-on stream chunks wait until `flush_interval_s` has passed since the previous flush,
so the process publishes at most that often for them however many tokens are in flight; an
isolated chunk, after a quiet spell, still leaves at once.

A flush that Redis refuses is tried again, the failed frames ahead of newer ones so every
channel keeps its order, backing off up to a second, for at most `REPUBLISH_WINDOW_S`; after
that the frames are dropped (their requests' ingress, which lost its subscription to the same
Redis, has failed them already: `ingress/replies.py`).

A request's last frame may come with a write of its claim (`state/claims.py` `ClaimWrite`:
the claim as answered, carrying the request's bill). A flush whose batch holds such writes is
one Lua script, the claims set and the frames published atomically, so that the answer never
reaches the client without its bill in Redis; a flush without (every follow-on chunk) stays
a plain PUBLISH. Writes are retried with their frames; the caller learns when its write is in
Redis (or was dropped with its frames), and only then writes the bill to Kafka, so that a
router killed in between never leaves a billed answer that nobody received."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis.asyncio as redis

from state.claims import ClaimWrite

log = logging.getLogger(__name__)

REPUBLISH_WINDOW_S = 10.0

# KEYS: claim keys; ARGV: per key its expected value, new value and TTL (ms), then pairs of
# channel and message. Compare-and-set: a claim finished meanwhile (the flush retried after
# the request's usage was written) stays finished. Channels are not keys: fine on a single
# Redis node, as PUBLISH itself is.
_WRITE_AND_PUBLISH_LUA = """
local n = #KEYS
for i = 1, n do
  if redis.call('GET', KEYS[i]) == ARGV[3 * i - 2] then
    redis.call('SET', KEYS[i], ARGV[3 * i - 1], 'PX', ARGV[3 * i])
  end
end
for j = 3 * n + 1, #ARGV, 2 do
  redis.call('PUBLISH', ARGV[j], ARGV[j + 1])
end
return n
"""


class ReplyPublisher:
    def __init__(self, client: redis.Redis, *, flush_interval_s: float = 0.0) -> None:
        self._redis = client
        self._interval_s = flush_interval_s
        self._pending: dict[str, list[bytes]] = {}
        # With the frames pending: each write, and what its caller waits on.
        self._writes: list[tuple[ClaimWrite, asyncio.Future[None]]] = []
        self._script: Any = client.register_script(_WRITE_AND_PUBLISH_LUA)
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._last_flush = 0.0
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._failing_since: float | None = None  # loop time of the first failed flush

    def publish(self, channel: str, frame: bytes, *, urgent: bool = True,
                write: ClaimWrite | None = None) -> asyncio.Future[None] | None:
        """Queue one encoded frame; frames of a channel keep their order. A frame that is
        not urgent may wait up to the flush interval for company. `write` is made in the
        same atomic operation as the frame's publish; the future returned for it is done
        once that operation succeeded, or was given up on (Redis gone too long)."""
        self._pending.setdefault(channel, []).append(frame)
        flushed = None
        if write is not None:
            flushed = asyncio.get_running_loop().create_future()
            self._writes.append((write, flushed))
        if self._wake.is_set():
            return flushed
        if urgent:
            self._wake.set()
        elif self._timer is None:
            loop = asyncio.get_running_loop()
            delay_s = self._last_flush + self._interval_s - loop.time()
            if delay_s <= 0:
                self._wake.set()
            else:
                self._timer = loop.call_later(delay_s, self._wake.set)
        return flushed

    async def __aenter__(self) -> ReplyPublisher:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *_: object) -> None:
        # Not cancelled: a flush cut short would lose the frames it had taken.
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._last_flush = loop.time()
            batch, self._pending = self._pending, {}
            writes, self._writes = self._writes, []
            try:
                await self._flush(batch, writes)
                self._failing_since = None
                _resolve(writes)
            except (redis.RedisError, OSError) as exc:
                await self._failed(batch, writes, exc, loop.time())
            if self._closing:
                if not self._pending:
                    return
                self._wake.set()

    async def _failed(self, batch: dict[str, list[bytes]],
                      writes: list[tuple[ClaimWrite, asyncio.Future[None]]],
                      exc: BaseException, now: float) -> None:
        if self._failing_since is None:
            self._failing_since = now
        if now - self._failing_since > REPUBLISH_WINDOW_S or self._closing:
            log.warning("reply publish failed for %.0f s (%s): %d channels' frames dropped, "
                        "%d answers' bills with them", now - self._failing_since, exc,
                        len(batch), len(writes))
            self._failing_since = None
            _resolve(writes)
            return
        for channel, frames in self._pending.items():  # newer frames after the failed ones
            batch.setdefault(channel, []).extend(frames)
        self._pending = batch
        self._writes = writes + self._writes
        delay_s = min(0.05 * 2 ** min(int(now - self._failing_since), 5), 1.0)
        log.warning("reply publish failed (%s); trying again in %.2f s", exc, delay_s)
        await asyncio.sleep(delay_s)
        self._wake.set()

    async def _flush(self, batch: dict[str, list[bytes]],
                     writes: list[tuple[ClaimWrite, asyncio.Future[None]]]) -> None:
        if writes:
            args: list[bytes | str | int] = []
            for write, _ in writes:
                args += (write.expect, write.value, write.ttl_ms)
            for channel, frames in batch.items():
                args += (channel, b"".join(frames))
            await self._script(keys=[write.key for write, _ in writes], args=args)
            return
        if not batch:
            return
        if len(batch) == 1:  # the common case: one ingress; a pipeline costs more
            ((channel, frames),) = batch.items()
            await self._redis.publish(channel, b"".join(frames))
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for channel, frames in batch.items():
                pipe.publish(channel, b"".join(frames))
            await pipe.execute()


def _resolve(writes: list[tuple[ClaimWrite, asyncio.Future[None]]]) -> None:
    for _, flushed in writes:
        if not flushed.done():  # a waiter's cancellation is its own business
            flushed.set_result(None)
