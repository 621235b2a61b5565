"""A read-through, in-process cache for values that are read often and change rarely
(routing policies, tenants' provider keys)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

from state.runtime import outage

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ReadThroughCache(Generic[K, V]):
    """`load(key)` results kept for `ttl_s` (absent values too, as the loader returns them:
    most keys have nothing stored, and that must not cost a read per request). Concurrent
    misses for one key share one load. At most `max_entries` keys are kept, the oldest goes
    first. Errors are not cached: the next caller loads again. While the store is down (an
    `outage`, `state/runtime.py`), an expired value is served instead of the error: a policy
    or key a few minutes old beats a failed request; a key never loaded still fails."""

    def __init__(self, load: Callable[[K], Awaitable[V]], *, ttl_s: float,
                 max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic) -> None:
        self._load_value = load
        self._ttl_s = ttl_s
        self._max_entries = max(max_entries, 1)
        self._clock = clock
        self._cache: dict[K, tuple[V, float]] = {}
        self._loading: dict[K, asyncio.Task[V]] = {}

    async def get(self, key: K) -> V:
        hit = self._cache.get(key)
        if hit is not None and hit[1] > self._clock():
            return hit[0]
        task = self._loading.get(key)
        if task is None:
            task = asyncio.create_task(self._load(key))
            self._loading[key] = task
            task.add_done_callback(lambda done: self._loaded(key, done))
        try:
            # Shielded: one caller giving up must not cancel the load the others wait for.
            return await asyncio.shield(task)
        except Exception as exc:
            if hit is None or outage(exc) is None:
                raise
            return hit[0]

    def __len__(self) -> int:
        return len(self._cache)

    def __contains__(self, key: object) -> bool:
        return key in self._cache

    def invalidate(self, key: K) -> None:
        """Forget the key; a load under way no longer fills the cache."""
        self._cache.pop(key, None)
        self._loading.pop(key, None)

    def invalidate_where(self, matches: Callable[[K], bool]) -> None:
        """Forget every key for which `matches(key)` holds (loads under way included)."""
        for key in [k for k in (*self._cache, *self._loading) if matches(k)]:
            self.invalidate(key)

    def clear(self) -> None:
        """Forget everything; loads under way no longer fill the cache."""
        self._cache.clear()
        self._loading.clear()

    def _loaded(self, key: K, task: asyncio.Task[V]) -> None:
        if self._loading.get(key) is task:
            del self._loading[key]
        if not task.cancelled():
            task.exception()  # retrieved here too, in case every waiter had gone away

    async def _load(self, key: K) -> V:
        value = await self._load_value(key)
        # Only the load still registered fills the cache: one started before an
        # invalidate() may have read what was just replaced.
        if self._loading.get(key) is asyncio.current_task():
            self._cache.pop(key, None)  # re-inserted last: eviction is oldest-first
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
            self._cache[key] = (value, self._clock() + self._ttl_s)
        return value
