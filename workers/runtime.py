"""What every worker process does around its work: uvloop, logging, signals, metrics port."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import uvloop
from prometheus_client import CollectorRegistry, start_http_server

from topics.heap import settle_heap


def run_process(main: Callable[[asyncio.Event], Coroutine[Any, Any, None]],
                log_level: str) -> None:
    """Run `main(stop)` on uvloop; SIGTERM/SIGINT set `stop` for a graceful drain."""
    logging.basicConfig(level=log_level,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")

    async def _run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        settle_heap()  # what the worker imported; its clients and models are few objects
        await main(stop)

    uvloop.run(_run())


def serve_metrics(registry: CollectorRegistry, port: int) -> Callable[[], None]:
    """Expose `registry` on `port` (0: not at all); returns how to stop it."""
    if not port:
        return lambda: None
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)

    def stop() -> None:
        server.shutdown()
        thread.join(timeout=5)

    return stop
