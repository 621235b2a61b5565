"""Serving on without Redis: the record of what a process did instead of failing.

A router that cannot reach Redis after a request's claim still routes it, on the bandit
posteriors and circuit breakers it last read (`state/bandit.py` `CachedPosteriors`,
`state/breakers.py` `Breakers`), and drops the learning it cannot write. Each such fallback
is noted here: counted (a callback: the process's metric, by `what`) every time, logged at
most once per `log_every_s` per `what` with how many went unlogged, so an outage under load
does not write a line per request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Degraded:
    """One per process, shared by everything that falls back. `down` is True from a noted
    failure until a Redis call of one of them succeeds again (`up`): meanwhile they do not
    wait for Redis on a request's path (each wait could last the socket timeout) but serve
    what they know and retry in the background."""

    def __init__(self, count: Callable[[str], None] | None = None, *,
                 log_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._count = count
        self._log_every_s = log_every_s
        self._clock = clock
        self._logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}
        self.down = False

    def up(self) -> None:
        if self.down:
            self.down = False
            log.info("Redis answers again; serving from fresh state")

    def note(self, what: str, fallback: str, exc: BaseException | None = None) -> None:
        """One call that Redis did not answer (`exc`; None: not tried, Redis being down) and
        what was done instead."""
        self.down = True
        if self._count is not None:
            self._count(what)
        now = self._clock()
        last = self._logged.get(what)
        if last is not None and now - last < self._log_every_s:
            self._unlogged[what] = self._unlogged.get(what, 0) + 1
            return
        self._logged[what] = now
        skipped = self._unlogged.pop(what, 0)
        cause = f"{type(exc).__name__}: {exc}" if exc is not None else "down"
        log.warning("Redis unreachable for %s (%s); %s%s", what, cause, fallback,
                    f" ({skipped} more since the last report)" if skipped else "")
