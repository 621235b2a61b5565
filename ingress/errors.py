"""The one place exceptions become HTTP responses and SSE error events, in the protocol of
the route that failed: OpenAI's shape everywhere, Anthropic's on the Messages routes
(`ANTHROPIC_PATHS`, `ingress/messages.py`)."""

from __future__ import annotations

import logging
import math

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from topics.errors import (
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    SwitchyardError,
    Unauthorized,
)

log = logging.getLogger(__name__)

_HTTP_TO_ERROR: dict[int, type[SwitchyardError]] = {
    400: InvalidRequest, 401: Unauthorized, 404: NotFound, 413: PayloadTooLarge,
}
# Paths whose clients speak Anthropic's protocol: errors in its shape.
ANTHROPIC_PATHS = "/v1/messages"
# Anthropic's error type for each status (its documented table; 402 is its billing_error,
# 503 our outage, which its clients retry like its own 529 overloaded_error). Our `code` rides
# along in the error object, which Anthropic reserves the right to extend (its SDKs keep
# what they do not know).
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    402: "billing_error", 403: "permission_error", 404: "not_found_error",
                    413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    502: "api_error", 503: "overloaded_error", 504: "timeout_error"}


def anthropic_status(status: int) -> int:
    """Anthropic answers every invalid request with a 400, a body that breaks the schema
    included (our 422)."""
    return 400 if status == 422 else status


def anthropic_type(status: int) -> str:
    return _ANTHROPIC_TYPES.get(status) or ("api_error" if status >= 500
                                            else "invalid_request_error")


def anthropic_error_body(exc: SwitchyardError, request_id: str | None = None) -> bytes:
    """`{"type": "error", "error": {"type", "message", "code"}, "request_id"}`."""
    body: dict[str, object] = {"type": "error", "error": {"type": anthropic_type(exc.status),
                                                          "message": exc.message,
                                                          "code": exc.code}}
    if request_id is not None:
        body["request_id"] = request_id
    return orjson.dumps(body)


def anthropic_sse_error_event(exc: SwitchyardError) -> bytes:
    """Anthropic's `error` event: the end of a stream that failed after it started, which
    its SDKs raise as an APIStatusError."""
    return b"event: error\ndata: " + anthropic_error_body(exc) + b"\n\n"


def _anthropic(request: Request | None) -> bool:
    return request is not None and request.url.path.startswith(ANTHROPIC_PATHS)


def _request_id(request: Request) -> str | None:
    request_id = request.scope.get("state", {}).get("request_id")
    return request_id if isinstance(request_id, str) else None


def error_body(exc: SwitchyardError) -> bytes:
    return orjson.dumps({"error": exc.to_dict()})


def error_response(exc: SwitchyardError, headers: dict[str, str] | None = None,
                   request: Request | None = None) -> Response:
    """The error's response, in the shape of `request`'s protocol (OpenAI's without one)."""
    if exc.retry_after_s is not None:
        # Whole seconds, rounded up: the client must not come back before the provider said.
        headers = {**(headers or {}), "Retry-After": str(max(math.ceil(exc.retry_after_s), 0))}
    if request is not None and _anthropic(request):
        return Response(anthropic_error_body(exc, _request_id(request)),
                        status_code=anthropic_status(exc.status), headers=headers,
                        media_type="application/json")
    return Response(error_body(exc), status_code=exc.status, headers=headers,
                    media_type="application/json")


def sse_error_event(exc: SwitchyardError) -> bytes:
    """The final event of a stream that failed after it started: never a clean end, never
    `[DONE]`. A plain data event (no `event:` name, which browsers' EventSource would take
    for its own connection error); OpenAI's SDKs raise it as an APIError."""
    return b"data: " + error_body(exc) + b"\n\n"


async def on_switchyard_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SwitchyardError)
    return error_response(exc, request=request)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed("method not allowed"),
                              headers=dict(exc.headers or {}), request=request)
    cls = _HTTP_TO_ERROR.get(exc.status_code, SwitchyardError)
    error = cls(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    body = anthropic_error_body(error, _request_id(request)) if _anthropic(request) \
        else error_body(error)
    return Response(body, status_code=exc.status_code, media_type="application/json")


def unexpected_error_response(request: Request | None = None) -> Response:
    return error_response(SwitchyardError("internal error; see the gateway logs",
                                          code="internal_error"), request=request)
