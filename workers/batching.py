"""Micro-batching of synchronous work: everything submitted in one turn of the event loop is
handled by one call. The consume loop starts a task per record of a fetch before yielding,
so a fetch's worth of work lands in one batch with no timer and no added latency."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


class MicroBatcher(Generic[T, R]):
    def __init__(self, run: Callable[[Sequence[T]], Sequence[R]], *, max_batch: int) -> None:
        self._run = run
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._scheduled = False

    async def submit(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, done))
        if len(self._pending) >= self._max_batch:
            self._flush()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return await done

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        try:
            _settle(batch, self._run([item for item, _ in batch]))
        except Exception as exc:  # every waiter hears about it; the loop goes on
            _fail(batch, exc)


class ThreadBatcher(Generic[T, R]):
    """Blocking batch work (the prompt encoder: milliseconds a call) kept off the event loop:
    one call at a time in a worker thread, and what was submitted while it ran is the next
    call's batch (at most `max_batch`). Under load the batches grow by themselves; alone, a
    prompt waits for nothing."""

    def __init__(self, run: Callable[[Sequence[T]], Sequence[R]], *, max_batch: int) -> None:
        self._run = run
        self._max_batch = max_batch
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._worker: asyncio.Task[None] | None = None

    async def submit(self, item: T) -> R:
        done: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, done))
        if self._worker is None:
            self._worker = asyncio.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        batch: list[tuple[T, asyncio.Future[R]]] = []
        try:
            while self._pending:
                batch = self._pending[:self._max_batch]
                del self._pending[:self._max_batch]
                try:
                    _settle(batch, await asyncio.to_thread(self._run,
                                                           [item for item, _ in batch]))
                except Exception as exc:  # every waiter hears about it; the next batch runs
                    _fail(batch, exc)
        except asyncio.CancelledError:  # shutting down: no waiter is left waiting
            for _, done in [*batch, *self._pending]:
                done.cancel()
            self._pending.clear()
            raise
        finally:
            self._worker = None


def _settle(batch: Sequence[tuple[T, asyncio.Future[R]]], results: Sequence[R]) -> None:
    """Each waiter its own result; a count that does not match is an error, never a wrong
    answer."""
    if len(results) != len(batch):
        raise ValueError(f"a batch of {len(batch)} got {len(results)} results")
    for (_, done), result in zip(batch, results, strict=True):
        if not done.done():  # a waiter's cancellation is its own business
            done.set_result(result)


def _fail(batch: Sequence[tuple[T, asyncio.Future[R]]], exc: Exception) -> None:
    for _, done in batch:
        if not done.done():
            done.set_exception(exc)
