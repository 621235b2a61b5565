"""The one place exceptions become HTTP responses and SSE error events."""

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


def error_body(exc: SwitchyardError) -> bytes:
    return orjson.dumps({"error": exc.to_dict()})


def error_response(exc: SwitchyardError, headers: dict[str, str] | None = None) -> Response:
    if exc.retry_after_s is not None:
        # Whole seconds, rounded up: the client must not come back before the provider said.
        headers = {**(headers or {}), "Retry-After": str(max(math.ceil(exc.retry_after_s), 0))}
    return Response(error_body(exc), status_code=exc.status, headers=headers,
                    media_type="application/json")


def sse_error_event(exc: SwitchyardError) -> bytes:
    """The final event of a stream that failed after it started: never a clean end, never
    `[DONE]`. A plain data event (no `event:` name, which browsers' EventSource would take
    for its own connection error); OpenAI's SDKs raise it as an APIError."""
    return b"data: " + error_body(exc) + b"\n\n"


async def on_switchyard_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SwitchyardError)
    return error_response(exc)


async def on_http_exception(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        return error_response(MethodNotAllowed("method not allowed"),
                              headers=dict(exc.headers or {}))
    cls = _HTTP_TO_ERROR.get(exc.status_code, SwitchyardError)
    error = cls(str(exc.detail), code="not_found" if exc.status_code == 404 else None)
    return Response(error_body(error), status_code=exc.status_code,
                    media_type="application/json")


def unexpected_error_response() -> Response:
    return error_response(SwitchyardError("internal error; see the gateway logs",
                                          code="internal_error"))
