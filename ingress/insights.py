"""What the gateway has learned and what it is told: GET /v1/advisor, GET
/v1/providers/stats, POST /v1/feedback."""

from __future__ import annotations

from dataclasses import asdict

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ingress.bodies import read_body
from ingress.call import Call
from ingress.validation import parse_body
from state.advisor import recommendations
from state.routing_policy import get_policy
from state.usage import answered_request
from topics.bandit import feedback_weight
from topics.errors import NotFound
from topics.routing_policy import CATEGORIES, GENERAL_CATEGORY


async def advisor(call: Call) -> Response:
    """Recommendations from the tenant's usage ledger, each with the figures behind it."""
    found = await recommendations(call.services.pool, call.principal.tenant_id)
    return Response(orjson.dumps({"object": "list", "data": found}),
                    media_type="application/json")


_MAX_FEEDBACK_BYTES = 4096  # a request id and a score


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    request_id: str = Field(min_length=1, max_length=128)
    score: float = Field(ge=0, le=1)


async def feedback(call: Call) -> Response:
    """A quality score (0..1) for an answered request, `{request_id, score}`, once per request;
    it feeds the quality part of the route's reward."""
    services, tenant_id = call.services, call.principal.tenant_id
    given = parse_body(Feedback, await read_body(call.request, _MAX_FEEDBACK_BYTES))
    served = await answered_request(services.pool, tenant_id, given.request_id)
    if served is None:
        # Unknown, someone else's, or not answered (yet): the same answer for all three.
        raise NotFound(f"no answered request {given.request_id!r} for this tenant",
                       code="request_not_found", param="request_id")
    policy = await get_policy(services.pool, tenant_id)
    counted = await services.posteriors.feedback(
        given.request_id, served["category"] or GENERAL_CATEGORY, served["model"],
        given.score,
        weight=feedback_weight(policy.weights, services.settings.router.feedback_rate))
    return Response(orjson.dumps({"object": "feedback", "request_id": given.request_id,
                                  "model": served["model"], "counted": counted}),
                    media_type="application/json")


async def stats(call: Call) -> Response:
    """Per route and category, what the shared posteriors hold (selections, successes,
    failures, latency, feedback); per route, its circuit breaker as every router sees it."""
    catalog = call.services.catalog
    routes = [m.id for m in catalog.models if m.kind == "chat"]
    provider = {m.id: m.provider for m in catalog.models}
    arms = await call.services.posteriors.stats([*CATEGORIES, GENERAL_CATEGORY], routes)
    data = [{"provider": provider[arm.route], **asdict(arm)} for arm in arms
            if arm.selections or arm.successes or arm.failures or arm.feedback]
    views = await call.services.breakers.views(routes)
    # Routes that never failed are closed with nothing counted: listed only once seen.
    breakers = [{"provider": provider[v.route], **asdict(v), "state": v.state.value}
                for v in views if v.calls_in_window or v.opened_at_ms is not None
                or v.state.value != "closed"]
    return Response(orjson.dumps({"object": "list", "data": data, "breakers": breakers}),
                    media_type="application/json")
