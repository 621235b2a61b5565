"""When a route that failed is called again, before the request fails over to the next one.

Only a transient fault of the provider before anything was answered (its error says
`transient`: HTTP 429, 500, 502, 503, 504; a connection refused, or closed before the response
headers) is retried on the same route, at most `retries` times. The wait is the provider's
`Retry-After` if it sent one (and it is at most `retry_after_max_ms`: a provider asking for
longer is failed over at once), else a jittered exponential backoff. A wait that, with the
shortest useful call after it, would not fit the request's deadline is not taken: the request
fails over (or fails) at once, never sleeping past its deadline. The executor
(workers/router/execute.py) schedules the calls; the settings are RouterSettings'
`route_retries`, `retry_backoff_base_ms`, `retry_backoff_cap_ms`, `retry_after_max_ms`."""

from __future__ import annotations

import random
from dataclasses import dataclass

from topics.errors import SwitchyardError
from topics.settings import RouterSettings

# A retry is not worth making with less than this left before the deadline.
MIN_CALL_MS = 250.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    retries: int  # calls to a route after its first
    base_ms: float
    cap_ms: float
    retry_after_max_ms: float

    @classmethod
    def from_settings(cls, router: RouterSettings) -> RetryPolicy:
        return cls(retries=router.route_retries, base_ms=router.retry_backoff_base_ms,
                   cap_ms=router.retry_backoff_cap_ms,
                   retry_after_max_ms=router.retry_after_max_ms)

    def backoff_ms(self, retry: int, rng: random.Random | None = None) -> float:
        """The wait before retry number `retry` (1: the first) when the provider named none:
        the base doubled for each retry before it, at most the cap, and jittered to between
        half and all of that (so that callers who failed together do not return together)."""
        full = min(self.cap_ms, self.base_ms * 2.0 ** max(retry - 1, 0))
        return full * (0.5 + 0.5 * (rng or random).random())

    def wait_ms(self, error: SwitchyardError, retry: int, left_ms: float,
                rng: random.Random | None = None) -> float | None:
        """How long to wait before retry number `retry` of the route that failed with
        `error`, with `left_ms` before the request's deadline; None: do not retry it."""
        if not error.transient or retry > self.retries:
            return None
        if error.retry_after_s is not None:
            wait = error.retry_after_s * 1000
            if wait > self.retry_after_max_ms:
                return None
        else:
            wait = self.backoff_ms(retry, rng)
        if wait + MIN_CALL_MS > left_ms:
            return None
        return wait
