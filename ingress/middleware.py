"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streams and costs CPU)."""

from __future__ import annotations

import logging
import time
import uuid

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingress.errors import unexpected_error_response
from ingress.metrics import IngressMetrics

log = logging.getLogger(__name__)


class RequestIdentity:
    """Gives every request an id (`x-request-id` on every response, errors included) and
    records its status and time to response head."""

    def __init__(self, app: ASGIApp, metrics: IngressMetrics, routes: frozenset[str]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # Ours, never the client's: a reused id would collide with an earlier request's claim.
        request_id = f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        route = scope["path"] if scope["path"] in self._routes else "other"  # bounded labels
        started = time.perf_counter()
        metrics = self._metrics

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
                headers = [h for h in message.get("headers", []) if h[0] != b"x-request-id"]
                # What admission left for every response of the request: the rate-limit
                # headers (ingress/admission.py), on errors and streams too.
                extra = scope["state"].get("response_headers", ())
                message["headers"] = [*headers, *extra, header]
                metrics.requests.labels(route, str(message["status"])).inc()
                metrics.latency.labels(route).observe(time.perf_counter() - started)
            await send(message)

        metrics.in_flight.inc()
        try:
            await self._app(scope, receive, send_with_id)
        except Exception:
            # The boundary for what no handler expected: still a 500 in the route's
            # protocol's shape with its request id, never a traceback. Re-raised if the
            # response already started.
            log.exception("unhandled error on %s", request_id)
            if started_response:
                raise
            await unexpected_error_response(Request(scope))(scope, receive, send_with_id)
        finally:
            metrics.in_flight.dec()
