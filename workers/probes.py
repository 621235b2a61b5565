"""A worker's one small HTTP server, on its metrics port: `/metrics` (Prometheus text),
`/healthz` (liveness: the event loop answers) and `/readyz` (the consume loop's
`ConsumerLoop.status`: 200 with `{"status", "partitions", "lag"}` once it runs and the group
has given it an assignment, 503 before and while it stops).

It runs on the process's event loop, so an answer to `/healthz` proves the loop turns, and
`/readyz` reads the loop's own state; it is started and closed by the process's runtime
(`ProbeServer.start`, `Runtime.on_close`). A few hundred bytes of HTTP/1.1, one request per
connection: scrapers and kubelets need no more, and nothing of it is on the requests' path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import orjson
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)

from state.runtime import Runtime

log = logging.getLogger(__name__)

Readiness = Callable[[], tuple[bool, dict[str, object]]]

_REQUEST_TIMEOUT_S = 5.0
_MAX_HEAD_BYTES = 8192
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def process_registry() -> CollectorRegistry:
    """A registry of the process's own, with prometheus_client's process basics (`process_*`,
    `python_*`: memory, CPU, file descriptors, GC)."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


class ProbeServer:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: asyncio.Server | None = None
        self._readiness: Readiness | None = None  # None: nothing to be ready yet

    def watch(self, readiness: Readiness) -> None:
        """What `/readyz` answers from, once the consume loop exists."""
        self._readiness = readiness

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port,
                                                  limit=_MAX_HEAD_BYTES)
        log.info("metrics and probes on http://%s:%d/metrics", host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Connections in flight are a scrape or a probe: they end within their timeout.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_REQUEST_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
                status, content_type, body = self._answer(head)
                writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n"
                             b"Connection: close\r\n\r\n" % (
                                 status, _REASONS[status].encode(), content_type.encode(),
                                 len(body)) + body)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ConnectionError):
            pass  # a client that went away or sent nonsense: nothing to answer
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _answer(self, head: bytes) -> tuple[int, str, bytes]:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        if method != b"GET":
            return 405, "text/plain", b"method not allowed\n"
        if path == b"/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == b"/healthz":
            return 200, "application/json", b'{"status":"ok"}'
        if path == b"/readyz":
            ready, body = (False, {"status": "starting", "partitions": 0, "lag": 0}) \
                if self._readiness is None else self._readiness()
            return 200 if ready else 503, "application/json", orjson.dumps(body)
        return 404, "text/plain", b"not found\n"


async def serve_probes(runtime: Runtime, registry: CollectorRegistry, host: str,
                       port: int) -> ProbeServer:
    """Start the server on `host:port`, closed with `runtime` (the last of its resources:
    while the process drains, `/readyz` says 503). Port 0: no server; the one returned only
    holds the readiness."""
    server = ProbeServer(registry)
    if port:
        await server.start(host, port)
        runtime.on_close(server.close, name="probe server")
    return server
