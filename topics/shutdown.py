"""A process's bounded stop, shared by the workers (`workers/runtime.py`) and the ingress
(`ingress/server.py`): the first SIGTERM/SIGINT starts the graceful stop and a timer; a
process still alive when the timer fires, or that gets a second signal, exits at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class ShutdownWatchdog:
    """Counts stop signals: the first calls `on_first` (the graceful stop) and arms a timer
    that ends the process after `deadline_s`; the second ends it at once. Both exits skip the
    interpreter's cleanup (`os._exit`): what is left by then is waits on services that do not
    answer."""

    def __init__(self, deadline_s: float, *, on_first: Callable[[], None],
                 exit_now: Callable[[int], None] = os._exit) -> None:
        self._deadline_s = deadline_s
        self._on_first = on_first
        self._exit = exit_now
        self._timer: threading.Timer | None = None

    @property
    def deadline_s(self) -> float:
        return self._deadline_s

    def signal(self, signum: int) -> None:
        name = signal.Signals(signum).name
        if self._timer is not None:
            _last_words(f"second {name} while stopping: exiting now")
            self._exit(128 + signum)
            return
        log.info("%s: stopping within %.1f s (a second signal exits at once)", name,
                 self._deadline_s)
        self._timer = threading.Timer(self._deadline_s, self._overran)
        self._timer.daemon = True
        self._timer.start()
        self._on_first()

    def _overran(self) -> None:
        _last_words(f"still stopping {self._deadline_s:.1f} s after the stop signal: "
                    "exiting now")
        self._exit(1)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()


def _last_words(message: str) -> None:
    log.error(message)
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
