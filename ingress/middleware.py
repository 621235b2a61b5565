"""Pure ASGI middleware (no BaseHTTPMiddleware: it buffers streams and costs CPU)."""

from __future__ import annotations

import logging
import time
import uuid

from opentelemetry.context import attach, detach
from opentelemetry.trace import StatusCode
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ingress.errors import unexpected_error_response
from ingress.metrics import NO_MODE, IngressMetrics
from topics.tracing import Tracing, traceparent_of

# Set here whatever the application set: the request's own id and trace.
_OURS = frozenset((b"x-request-id", b"x-trace-id", b"traceparent"))

log = logging.getLogger(__name__)


class RequestIdentity:
    """Gives every request an id (`x-request-id` on every response, errors included) and a
    trace (`x-trace-id` and `traceparent` on every response: its server span's when tracing
    is on, `topics/tracing.py`; made up, under the client's `traceparent` if any, when off),
    and records its status and time to response head."""

    def __init__(self, app: ASGIApp, metrics: IngressMetrics, routes: frozenset[str]) -> None:
        self._app = app
        self._metrics = metrics
        self._routes = routes
        # An application run without its lifespan (some tests): no spans, ids still made.
        self._untraced = Tracing()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # Ours, never the client's: a reused id would collide with an earlier request's claim.
        request_id = f"req_{uuid.uuid4().hex}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        route = scope["path"] if scope["path"] in self._routes else "other"  # bounded labels
        tracing: Tracing = state.get("tracing") or self._untraced
        span, span_context, trace_context = tracing.request(
            _header(scope, b"traceparent"), request_id, scope["method"], route, scope["path"])
        traceparent = traceparent_of(span_context)
        state["traceparent"] = traceparent  # what the request's messages carry
        trace_headers = ((b"x-trace-id", f"{span_context.trace_id:032x}".encode()),
                         (b"traceparent", traceparent.encode()))
        started = time.perf_counter()
        metrics = self._metrics

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal started_response
            if message["type"] == "http.response.start":
                started_response = True
                headers = [h for h in message.get("headers", []) if h[0] not in _OURS]
                # What admission left for every response of the request: the rate-limit
                # headers (ingress/admission.py), on errors and streams too.
                extra = scope["state"].get("response_headers", ())
                message["headers"] = [*headers, *extra, header, *trace_headers]
                if span.is_recording():
                    span.set_attribute("http.response.status_code", message["status"])
                    if message["status"] >= 500:
                        span.set_status(StatusCode.ERROR)
                # The routing mode, once admission has read it (`ingress/admission.py`).
                metrics.answered(route, str(message["status"]),
                                 scope["state"].get("mode", NO_MODE),
                                 time.perf_counter() - started)
            await send(message)

        metrics.in_flight.inc()
        token = attach(trace_context)
        try:
            await self._app(scope, receive, send_with_id)
        except Exception as exc:
            # The boundary for what no handler expected: still a 500 in the route's
            # protocol's shape with its request id, never a traceback. Re-raised if the
            # response already started.
            log.exception("unhandled error on %s", request_id)
            span.record_exception(exc)
            if started_response:
                raise
            await unexpected_error_response(Request(scope))(scope, receive, send_with_id)
        finally:
            metrics.in_flight.dec()
            detach(token)
            if span.is_recording():
                template = getattr(scope.get("route"), "path", None)
                if template is not None:  # the route's template: bounded, unlike the path
                    span.update_name(f"{scope['method']} {template}")
                    span.set_attribute("http.route", template)
                span.end()


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None
