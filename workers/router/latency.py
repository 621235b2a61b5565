"""Each route's recent time to first answer, as this process observed it: what hedging waits
for before it starts a second route.

Process-local on purpose: a percentile must be available without a Redis round trip on the
path of every hedged request, and each router sees enough of the traffic to estimate it."""

from __future__ import annotations

from collections import deque

import numpy as np


class LatencyTracker:
    def __init__(self, *, window: int = 512, min_samples: int = 20) -> None:
        self._window = window
        self._min_samples = min_samples
        self._samples: dict[tuple[str, bool], deque[float]] = {}
        # Percentiles recomputed at most once per `window // 16` new samples: cheap per call,
        # and a stale-by-a-few-samples percentile is as good a hedge delay as a fresh one.
        self._cached: dict[tuple[str, bool, float], tuple[int, float]] = {}
        self._added: dict[tuple[str, bool], int] = {}

    def observe(self, route: str, streamed: bool, first_answer_ms: float) -> None:
        key = (route, streamed)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self._window)
        samples.append(first_answer_ms)
        self._added[key] = self._added.get(key, 0) + 1

    def percentile(self, route: str, streamed: bool, pct: float) -> float | None:
        """The `pct` percentile of the route's recent times to first answer, or None while
        there are fewer than `min_samples` of them."""
        key = (route, streamed)
        samples = self._samples.get(key)
        if samples is None or len(samples) < self._min_samples:
            return None
        added = self._added[key]
        cached = self._cached.get((route, streamed, pct))
        if cached is not None and added - cached[0] < max(self._window // 16, 1):
            return cached[1]
        value = float(np.percentile(np.fromiter(samples, dtype=np.float64), pct))
        self._cached[(route, streamed, pct)] = (added, value)
        return value
