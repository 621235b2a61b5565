"""How a route of `ingress/routes.py` becomes a Starlette endpoint: the one authentication
step, and the `Call` every handler receives.

A handler is `async def handler(call: Call) -> Response`. It never authenticates: the route
table states the permission each route requires (`topics/identity.py`), and the endpoint
built here establishes the request's principal and checks that its role grants that
permission before the handler runs (the key comes as `Authorization: Bearer <key>` or, as
Anthropic's clients send it, `x-api-key: <key>`); otherwise it answers 401 (no or a bad
credential) or 403 `permission_denied` without running it. What a handler can reach is
`Call.services` (`ingress/services.py`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress.services import Services
from state.runtime import outage
from topics.errors import SwitchyardError, Unauthorized
from topics.identity import Permission, Principal

PUBLIC = None  # a route anyone may call: probes and scrapes


@dataclass(frozen=True, slots=True)
class Call:
    request: Request
    services: Services
    caller: Principal | None  # None only on public routes

    @property
    def principal(self) -> Principal:
        """Who is calling; a public route that asks has a bug, reported as a 401."""
        if self.caller is None:
            raise Unauthorized("this route needs an API key")
        return self.caller

    @property
    def request_id(self) -> str:
        request_id: str = self.request.scope["state"]["request_id"]  # ingress/middleware.py
        return request_id


Handler = Callable[[Call], Awaitable[Response]]


def credential_of(request: Request) -> str | None:
    """The request's Authorization header; else its `x-api-key` (Anthropic's clients send
    the key there) as a bearer credential. Both: the Authorization header counts."""
    authorization = request.headers.get("authorization")
    if authorization:
        return authorization
    api_key = request.headers.get("x-api-key", "").strip()
    return f"Bearer {api_key}" if api_key else None


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One line of the route table."""

    method: str
    path: str
    handler: Handler
    permission: Permission | None  # None: PUBLIC

    def route(self) -> Route:
        handler, permission = self.handler, self.permission

        async def endpoint(request: Request) -> Response:
            services: Services = request.scope["state"]["services"]
            try:
                caller = None
                if permission is not None:  # not PUBLIC
                    caller = await services.auth.authenticate(credential_of(request))
                    caller.require(permission)
                return await handler(Call(request, services, caller))
            except SwitchyardError:
                raise
            except Exception as exc:
                # PostgreSQL or Redis down: 503 with Retry-After, never a bare 500.
                if (down := outage(exc)) is None:
                    raise
                raise down from exc

        return Route(self.path, endpoint, methods=[self.method], name=handler.__name__)
