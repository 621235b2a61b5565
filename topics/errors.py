"""The one exception tree. Library errors are translated into these at the boundary (a
provider's by `workers/providers/errors.py`); the ingress maps them to HTTP/SSE in one place
(`ingress/errors.py`); error frames carry them across Kafka and Redis."""

from __future__ import annotations

from typing import Any, ClassVar


class SwitchyardError(Exception):
    """An error a client may see, OpenAI-shaped: {"error": {message, type, code, param}}."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    default_code: ClassVar[str] = "internal_error"
    retryable: bool = False  # the class default; an instance may say otherwise

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None,
                 retryable: bool | None = None, retry_after_s: float | None = None,
                 transient: bool = False):
        super().__init__(message)
        self.message = message
        self.code = code or self.default_code
        self.param = param
        self.retryable = type(self).retryable if retryable is None else retryable
        # When the client may try again, in seconds (a provider's `Retry-After`): the ingress
        # sends it as the response's `Retry-After` header.
        self.retry_after_s = retry_after_s
        # A passing fault of the provider before any answer (5xx, 429, a connection refused
        # or reset before the response headers): worth another call to the same route.
        # Known to the router only; never sent in a frame.
        self.transient = transient

    def to_dict(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.type, "code": self.code,
                "param": self.param}

    def to_frame_data(self) -> dict[str, Any]:
        data = {"status": self.status, **self.to_dict()}
        if self.retry_after_s is not None:
            data["retry_after_s"] = self.retry_after_s
        return data

    @staticmethod
    def from_frame_data(data: dict[str, Any]) -> SwitchyardError:
        cls = _BY_STATUS.get(int(data.get("status", 500)), SwitchyardError)
        retry_after = data.get("retry_after_s")
        if cls is BudgetExceeded and isinstance(data.get("details"), dict):
            return BudgetExceeded(str(data.get("message", "error")), code=data.get("code"),
                                  details=data["details"])
        return cls(str(data.get("message", "error")), code=data.get("code"),
                   param=data.get("param"),
                   retry_after_s=float(retry_after) if isinstance(retry_after, int | float)
                   else None)


class InvalidRequest(SwitchyardError):
    status = 400
    type = "invalid_request_error"
    default_code = "invalid_request"


class Unauthorized(SwitchyardError):
    status = 401
    type = "authentication_error"
    default_code = "invalid_api_key"


class Forbidden(SwitchyardError):
    status = 403
    type = "permission_error"
    default_code = "forbidden"


class NotFound(SwitchyardError):
    status = 404
    type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(SwitchyardError):
    status = 405
    type = "invalid_request_error"
    default_code = "method_not_allowed"


class Conflict(SwitchyardError):
    """The request contradicts what is stored (a name already taken)."""

    status = 409
    type = "invalid_request_error"
    default_code = "conflict"


class PayloadTooLarge(SwitchyardError):
    status = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class Unprocessable(SwitchyardError):
    status = 422
    type = "invalid_request_error"
    default_code = "invalid_value"


class BudgetExceeded(SwitchyardError):
    """402: a hard spend budget would be exceeded by this request (`topics/budgets.py`);
    `details` says by how much and when the budget resets. The seed product's type name."""

    status = 402
    type = "budget_limit_error"
    default_code = "budget_exceeded"

    def __init__(self, message: str, *, details: dict[str, Any] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.details = details or {}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "details": self.details}


class RateLimited(SwitchyardError):
    status = 429
    type = "rate_limit_error"
    default_code = "rate_limited"
    retryable = True


class UpstreamError(SwitchyardError):
    """The provider failed; its own message is kept in `message`."""

    status = 502
    type = "upstream_error"
    default_code = "upstream_error"
    retryable = True


class Unavailable(SwitchyardError):
    status = 503
    type = "server_error"
    default_code = "unavailable"
    retryable = True


class GatewayTimeout(SwitchyardError):
    status = 504
    type = "timeout_error"
    default_code = "timeout"
    retryable = True


class ClientClosedRequest(SwitchyardError):
    """The client left before its answer; nobody reads this error (nginx's 499)."""

    status = 499
    type = "client_error"
    default_code = "client_closed_request"


_BY_STATUS: dict[int, type[SwitchyardError]] = {
    cls.status: cls
    for cls in (InvalidRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed,
                Conflict, PayloadTooLarge, Unprocessable, BudgetExceeded,
                RateLimited, UpstreamError, Unavailable, GatewayTimeout)
}
