"""The one provider error taxonomy. Every dialect classifies what its provider said into one
of these kinds; the provider's own message is kept in ours, an error of the one tree
(`topics/errors.py`), which the ingress maps to HTTP (`ingress/errors.py`)."""

from __future__ import annotations

import enum

import aiohttp

from topics.errors import (
    GatewayTimeout,
    InvalidRequest,
    RateLimited,
    SwitchyardError,
    Unavailable,
    UpstreamError,
)


class Kind(enum.Enum):
    RATE_LIMITED = "rate_limited"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    AUTH = "auth"
    BAD_REQUEST = "bad_request"
    CONTENT_FILTERED = "content_filtered"
    SERVER_ERROR = "server_error"


# kind → (our error class, retryable on another route or later)
_TAXONOMY: dict[Kind, tuple[type[SwitchyardError], bool]] = {
    Kind.RATE_LIMITED: (RateLimited, True),
    Kind.OVERLOADED: (Unavailable, True),
    Kind.TIMEOUT: (GatewayTimeout, True),
    Kind.AUTH: (UpstreamError, False),  # our key is wrong: another try will not fix it
    Kind.BAD_REQUEST: (InvalidRequest, False),
    Kind.CONTENT_FILTERED: (InvalidRequest, False),
    Kind.SERVER_ERROR: (UpstreamError, True),
}


def provider_error(kind: Kind, provider: str, message: str) -> SwitchyardError:
    cls, retryable = _TAXONOMY[kind]
    return cls(f"{provider}: {message}", code=f"upstream_{kind.value}", retryable=retryable)


def kind_of_status(status: int) -> Kind:
    """The kind an HTTP status means when the body says nothing more precise."""
    if status == 429:
        return Kind.RATE_LIMITED
    if status in (503, 529):
        return Kind.OVERLOADED
    if status in (408, 504):
        return Kind.TIMEOUT
    if status in (401, 403):
        return Kind.AUTH
    if 400 <= status < 500:
        return Kind.BAD_REQUEST
    return Kind.SERVER_ERROR


def stream_cut(provider: str) -> SwitchyardError:
    return UpstreamError(f"{provider} ended the stream before it was complete",
                         code="upstream_stream_cut", retryable=True)


def transport_error(provider: str, exc: aiohttp.ClientError) -> SwitchyardError:
    if isinstance(exc, aiohttp.ClientPayloadError | aiohttp.ServerDisconnectedError):
        return UpstreamError(f"{provider} cut the connection mid-answer",
                             code="upstream_stream_cut", retryable=True)
    return UpstreamError(f"{provider} unreachable: {exc}", code="upstream_unreachable",
                         retryable=True)


def timed_out(provider: str, phase: str) -> SwitchyardError:
    return GatewayTimeout(f"{provider}: no {phase} in time", code="upstream_timeout",
                          retryable=True)


def unsupported(provider: str, param: str, why: str = "") -> SwitchyardError:
    """A parameter the provider cannot honour: refused, never silently dropped."""
    return InvalidRequest(f"{param} is not supported by {provider}" + (f": {why}" if why else ""),
                          code="unsupported_parameter", param=param)
