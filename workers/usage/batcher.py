"""Folds the usage events in flight into one ledger statement. Each event's handler returns
only after the statement holding it has committed, so offsets never pass unrecorded usage."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import asyncpg

from topics.messages import UsageEvent
from workers.usage.metrics import UsageMetrics

log = logging.getLogger(__name__)

Writer = Callable[[Sequence[UsageEvent]], Awaitable[None]]

_RETRYABLE = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError,
              asyncpg.exceptions.CannotConnectNowError, TimeoutError)


class UsageBatcher:
    def __init__(self, write: Writer, *, batch_max: int, linger_s: float,
                 metrics: UsageMetrics | None = None) -> None:
        self._write = write
        self._metrics = metrics
        self._batch_max = batch_max
        self._linger_s = linger_s
        self._pending: list[tuple[UsageEvent, asyncio.Future[None]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    async def add(self, event: UsageEvent) -> None:
        done = asyncio.get_running_loop().create_future()
        self._pending.append((event, done))
        if len(self._pending) >= self._batch_max:
            self._flush_now()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger_s, self._flush_now)
        await done

    def _flush_now(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[UsageEvent, asyncio.Future[None]]]) -> None:
        delay_s = 0.1
        while True:
            try:
                await self._write([event for event, _ in batch])
                break
            except _RETRYABLE as exc:
                # The database is down or restarting: usage must wait, never be dropped.
                log.warning("usage write failed (%s); retrying in %.1fs", exc, delay_s)
                if self._metrics is not None:
                    self._metrics.retried.inc(len(batch))
                await asyncio.sleep(delay_s)
                delay_s = min(delay_s * 2, 5.0)
            except Exception as exc:
                if self._metrics is not None:
                    self._metrics.failed.inc(len(batch))
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                return
        for _, done in batch:
            if not done.done():
                done.set_result(None)
