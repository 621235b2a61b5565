"""The tenant's routing policy: GET, PUT and DELETE /v1/routing/policy. The tenant is the one
of the bearer API key. PUT replaces the whole policy (fields left out take their defaults).

Every answer has one shape: {"object": "routing.policy", "source": "stored" | "default",
"updated_at": unix seconds | null, "policy": {...every field...}}; DELETE adds "deleted".
Routers see a change within SWITCHYARD_ROUTER__POLICY_CACHE_TTL_S.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from ingress.bodies import json_response, read_body
from ingress.schema import parse_json_object
from state.routing_policy import EffectivePolicy, delete_policy, put_policy, read_policy
from topics.bandit import ObjectiveWeights as PolicyWeights
from topics.catalog import Catalog
from topics.errors import Unprocessable
from topics.routing_policy import RoutingPolicy, validate_against

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]

MAX_BODY_BYTES = 64 * 1024  # a policy naming every model of the catalog is a few KiB


@dataclass(frozen=True, slots=True)
class RoutingPolicyDeps:
    auth: Authenticator
    catalog: Catalog
    pool: asyncpg.Pool


def get_policy_route(deps: RoutingPolicyDeps) -> Handler:
    async def get(request: Request) -> Response:
        owner = await deps.auth.authenticate(request.headers.get("authorization"))
        # Read from PostgreSQL, not a cache: a PUT is visible to the next GET.
        return json_response(_view(await read_policy(deps.pool, owner.tenant_id)))

    return get


def put_policy_route(deps: RoutingPolicyDeps) -> Handler:
    async def put(request: Request) -> Response:
        owner = await deps.auth.authenticate(request.headers.get("authorization"))
        policy = parse_policy(await read_body(request, MAX_BODY_BYTES))
        validate_against(policy, deps.catalog)
        stored = await put_policy(deps.pool, owner.tenant_id, policy)
        log.info("tenant %s replaced its routing policy", owner.tenant_id)
        return json_response(_view(stored))

    return put


def delete_policy_route(deps: RoutingPolicyDeps) -> Handler:
    async def delete(request: Request) -> Response:
        owner = await deps.auth.authenticate(request.headers.get("authorization"))
        # Idempotent: deleting the default is not an error, "deleted" says what happened.
        deleted = await delete_policy(deps.pool, owner.tenant_id)
        if deleted:
            log.info("tenant %s went back to the default routing policy", owner.tenant_id)
        return json_response({**_view(EffectivePolicy(RoutingPolicy(), "default", None)),
                      "deleted": deleted})

    return delete


def parse_policy(raw: bytes) -> RoutingPolicy:
    """The body as a policy, or a 422 naming the first field that is wrong."""
    try:
        return RoutingPolicy.model_validate(parse_json_object(raw))
    except ValidationError as exc:
        first = exc.errors(include_input=False, include_url=False)[0]
        param, reason = _describe(first)
        raise Unprocessable(f"{param}: {reason}", code="invalid_field", param=param) from None


def _describe(error: ErrorDetails) -> tuple[str, str]:
    # Pydantic marks a bad dict key with a trailing "[key]": the key itself names the field.
    loc = [str(p) for p in error["loc"] if p != "[key]"]
    param = ".".join(loc) or "policy"
    if error["type"] == "extra_forbidden":
        model: type[BaseModel] = PolicyWeights if loc[:1] == ["weights"] else RoutingPolicy
        return param, f"unknown field; expected one of {', '.join(model.model_fields)}"
    return param, error["msg"].removeprefix("Value error, ")


def _view(effective: EffectivePolicy) -> dict[str, Any]:
    updated = effective.updated_at
    return {"object": "routing.policy", "source": effective.source,
            "updated_at": None if updated is None else int(updated.timestamp()),
            "policy": effective.policy.public()}


