"""What the gateway has learned and what it is told: GET /v1/advisor, GET
/v1/providers/stats, POST /v1/feedback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass

import asyncpg
import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import Response

from ingress.auth import Authenticator
from ingress.bodies import read_body
from state.advisor import recommendations
from state.bandit import PosteriorStore
from state.breakers import Breakers
from state.routing_policy import get_policy
from topics.bandit import feedback_weight
from topics.catalog import Catalog
from topics.errors import NotFound, Unprocessable
from topics.routing_policy import CATEGORIES, GENERAL_CATEGORY


def advisor_route(auth: Authenticator,
                  pool: asyncpg.Pool) -> Callable[[Request], Awaitable[Response]]:
    async def advisor(request: Request) -> Response:
        owner = await auth.authenticate(request.headers.get("authorization"))
        found = await recommendations(pool, owner.tenant_id)
        return Response(orjson.dumps({"object": "list", "data": found}),
                        media_type="application/json")

    return advisor


@dataclass(frozen=True, slots=True)
class LearningDeps:
    auth: Authenticator
    pool: asyncpg.Pool
    store: PosteriorStore
    catalog: Catalog
    feedback_rate: float
    breakers: Breakers


_MAX_FEEDBACK_BYTES = 4096  # a request id and a score


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(min_length=1, max_length=128)
    score: float = Field(ge=0, le=1)


def feedback_route(deps: LearningDeps) -> Callable[[Request], Awaitable[Response]]:
    """POST /v1/feedback {request_id, score}: a quality score (0..1) for an answer, once per
    request; it feeds the quality part of the route's reward."""

    async def feedback(request: Request) -> Response:
        owner = await deps.auth.authenticate(request.headers.get("authorization"))
        try:
            given = Feedback.model_validate_json(await read_body(request, _MAX_FEEDBACK_BYTES))
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first["loc"]) or "body"
            raise Unprocessable(f"{param}: {first['msg']}", code="invalid_field",
                                param=param) from None
        served = await deps.pool.fetchrow(
            "SELECT model, category FROM usage_events WHERE request_id = $1 AND tenant_id = $2"
            " AND status = 'ok' ORDER BY finished_at DESC LIMIT 1",
            given.request_id, owner.tenant_id)
        if served is None:
            # Unknown, someone else's, or not answered (yet): the same answer for all three.
            raise NotFound(f"no answered request {given.request_id!r} for this tenant",
                           code="request_not_found", param="request_id")
        policy = await get_policy(deps.pool, owner.tenant_id)
        weights = policy.weights
        counted = await deps.store.feedback(
            given.request_id, served["category"] or GENERAL_CATEGORY, served["model"],
            given.score, weight=feedback_weight(weights, deps.feedback_rate))
        return Response(orjson.dumps({"object": "feedback", "request_id": given.request_id,
                                      "model": served["model"], "counted": counted}),
                        media_type="application/json")

    return feedback


def stats_route(deps: LearningDeps) -> Callable[[Request], Awaitable[Response]]:
    """GET /v1/providers/stats: per route and category, what the shared posteriors hold; and
    per route, its circuit breaker as every router sees it."""
    routes = [m.id for m in deps.catalog.models if m.kind == "chat"]
    provider = {m.id: m.provider for m in deps.catalog.models}

    async def stats(request: Request) -> Response:
        await deps.auth.authenticate(request.headers.get("authorization"))
        arms = await deps.store.stats([*CATEGORIES, GENERAL_CATEGORY], routes)
        data = [{"provider": provider[arm.route], **asdict(arm)} for arm in arms
                if arm.selections or arm.successes or arm.failures or arm.feedback]
        views = await deps.breakers.views(routes)
        # Routes that never failed are closed with nothing counted: listed only once seen.
        breakers = [{"provider": provider[v.route], **asdict(v), "state": v.state.value}
                    for v in views if v.calls_in_window or v.opened_at_ms is not None
                    or v.state.value != "closed"]
        return Response(orjson.dumps({"object": "list", "data": data,
                                      "breakers": breakers}),
                        media_type="application/json")

    return stats
