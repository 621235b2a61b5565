"""What the gateway has learned, for the tenant asking: GET /v1/advisor."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import asyncpg
import orjson
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from state.advisor import recommendations


def advisor_route(auth: Authenticator,
                  pool: asyncpg.Pool) -> Callable[[Request], Awaitable[Response]]:
    async def advisor(request: Request) -> Response:
        owner = await auth.authenticate(request.headers.get("authorization"))
        found = await recommendations(pool, owner.tenant_id)
        return Response(orjson.dumps({"object": "list", "data": found}),
                        media_type="application/json")

    return advisor
