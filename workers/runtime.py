"""What every worker process does around its work: uvloop, logging, signals. (Its metrics
and probe server: `workers/probes.py`.)

Stopping is bounded: the first SIGTERM/SIGINT sets `stop` (the worker drains within its grace
period, then closes its connections within `Settings.shutdown_close_timeout_s`); a process
still alive at grace + that budget + 1 s exits at once, whatever its infrastructure does, and
so does one that gets a second SIGTERM/SIGINT (`topics/shutdown.py`)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop

from topics.heap import settle_heap
from topics.logs import LogFormat, configure_logging
from topics.shutdown import ShutdownWatchdog

# Past grace + close budget, before the watchdog: the bounded closes' own last turns.
_MARGIN_S = 1.0


def run_process(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
                log_level: str, *, grace_s: float, close_timeout_s: float,
                process: str = "worker", log_format: LogFormat = "json") -> None:
    """Run `main(stop)` on uvloop; SIGTERM/SIGINT set `stop` for a graceful drain of at most
    `grace_s`, then closes of at most `close_timeout_s` (see the module's docstring). Logs go
    to stderr as `topics/logs.py` writes them, naming `process`."""
    configure_logging(process, log_level, log_format)

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        watchdog = ShutdownWatchdog(grace_s + close_timeout_s + _MARGIN_S, on_first=stop.set)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, watchdog.signal, sig)
        settle_heap()  # what the worker imported; its clients and models are few objects
        try:
            await main(stop)
        finally:
            watchdog.cancel()

    uvloop.run(_run())

