"""The ingress's uvicorn server with a bounded stop (`topics/shutdown.py`): on SIGTERM/SIGINT
it stops as uvicorn does (in-flight requests get `timeout_graceful_shutdown`, then the
lifespan closes the runtime within `Settings.shutdown_close_timeout_s`), and it exits at once
past that, or on a second signal, even when Kafka, Redis or PostgreSQL does not answer."""

from __future__ import annotations

from types import FrameType

import uvicorn

from topics.shutdown import ShutdownWatchdog

# uvicorn sleeps 0.1 s before its graceful wait; and the closes' own last turns.
_MARGIN_S = 1.0


class BoundedServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, *, close_timeout_s: float) -> None:
        super().__init__(config)
        grace = float(config.timeout_graceful_shutdown or 0)
        self._watchdog = ShutdownWatchdog(grace + close_timeout_s + _MARGIN_S,
                                          on_first=self._stop_gracefully)
        self._first: tuple[int, FrameType | None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._first is None:
            self._first = (sig, frame)
        self._watchdog.signal(sig)

    def _stop_gracefully(self) -> None:
        assert self._first is not None
        super().handle_exit(*self._first)
