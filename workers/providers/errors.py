"""The one provider error taxonomy. Every dialect classifies what its provider said into one
of these kinds; the provider's own message is kept in ours, an error of the one tree
(`topics/errors.py`), which the ingress maps to HTTP (`ingress/errors.py`)."""

from __future__ import annotations

import email.utils
import enum
import math
import time
from collections.abc import Mapping

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
    CONTEXT_LENGTH = "context_length_exceeded"
    CONTENT_FILTERED = "content_filtered"
    SERVER_ERROR = "server_error"


# kind → (our error class, retryable on another route or later). What decides the rest:
# - AUTH: our key for that provider is wrong. The same route will not answer (no same-route
#   retry) and its breaker opens (workers/router/attempt.py), but another provider may.
# - CONTEXT_LENGTH: the prompt does not fit this model; a model with a larger context
#   window may take it (workers/router/execute.py fails over to those only).
# - BAD_REQUEST, CONTENT_FILTERED: the caller's request itself; returned as they are.
_TAXONOMY: dict[Kind, tuple[type[SwitchyardError], bool]] = {
    Kind.RATE_LIMITED: (RateLimited, True),
    Kind.OVERLOADED: (Unavailable, True),
    Kind.TIMEOUT: (GatewayTimeout, True),
    Kind.AUTH: (UpstreamError, True),
    Kind.BAD_REQUEST: (InvalidRequest, False),
    Kind.CONTEXT_LENGTH: (InvalidRequest, True),
    Kind.CONTENT_FILTERED: (InvalidRequest, False),
    Kind.SERVER_ERROR: (UpstreamError, True),
}

CONTEXT_LENGTH_CODE = f"upstream_{Kind.CONTEXT_LENGTH.value}"
AUTH_CODE = f"upstream_{Kind.AUTH.value}"

# How providers say "the prompt does not fit": OpenAI and compatible servers
# ("maximum context length", code context_length_exceeded), Anthropic ("prompt is too
# long"), Gemini ("exceeds the maximum number of tokens allowed").
_CONTEXT_PHRASES = ("context length", "context_length", "context window",
                    "prompt is too long", "maximum number of tokens", "too many tokens")
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


# What the provider said with an HTTP status that another call to the same route may not
# say: rate limits, overload, server errors and its gateways' timeouts.
_TRANSIENT = frozenset({Kind.RATE_LIMITED, Kind.OVERLOADED, Kind.SERVER_ERROR, Kind.TIMEOUT})


def provider_error(kind: Kind, provider: str, message: str, *,
                   retry_after_s: float | None = None) -> SwitchyardError:
    """Our error for what the provider said with an HTTP status (or in a stream's error
    event); `retry_after_s`: when it said to come back."""
    cls, retryable = _TAXONOMY[kind]
    return cls(f"{provider}: {message}", code=f"upstream_{kind.value}", retryable=retryable,
               retry_after_s=retry_after_s, transient=kind in _TRANSIENT)


def retry_after_s(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds the provider asks us to wait, from its response headers, or None if it did not
    say (or said nothing usable). `Retry-After` is delay-seconds or an HTTP date (RFC 9110
    §10.2.3); OpenAI also sends `retry-after-ms`, which is more precise and wins. A date in
    the past is 0; a negative, non-finite or unparseable value is ignored."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            ms = float(raw_ms.strip())
        except ValueError:
            ms = math.nan
        if math.isfinite(ms) and ms >= 0:
            return ms / 1000
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # HTTP dates are GMT; a zone-less one is read as such
            return None
        wait = when.timestamp() - (time.time() if now is None else now)
        return max(wait, 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def with_retry_after(error: SwitchyardError, headers: Mapping[str, str]) -> SwitchyardError:
    """`error` carrying the `Retry-After` of the response it was read from, if it has one."""
    if error.retry_after_s is None:
        error.retry_after_s = retry_after_s(headers)
    return error


def refine_bad_request(kind: Kind, message: str, code: object = None) -> Kind:
    """A 400's kind from what the provider said: a context-length or content-filter refusal
    is told apart from any other request error by its code, else by its words."""
    if kind is not Kind.BAD_REQUEST:
        return kind
    text = message.lower()
    if code == "context_length_exceeded" or any(p in text for p in _CONTEXT_PHRASES):
        return Kind.CONTEXT_LENGTH
    if code in _FILTER_CODES or ("content" in text and ("filter" in text or "policy" in text)):
        return Kind.CONTENT_FILTERED
    return kind


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


def transport_error(provider: str, exc: aiohttp.ClientError, *,
                    answering: bool = True) -> SwitchyardError:
    """Our error for a failed connection. `answering`: the response headers had arrived.
    Before them, a refused connection or one closed without an answer is transient: nothing
    was answered, and another call may well be."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamError(f"{provider} unreachable: {exc}", code="upstream_unreachable",
                             retryable=True, transient=True)
    if not answering and isinstance(exc, aiohttp.ServerDisconnectedError
                                    | aiohttp.ClientOSError):
        return UpstreamError(f"{provider} closed the connection without answering",
                             code="upstream_connection_reset", retryable=True,
                             transient=True)
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
