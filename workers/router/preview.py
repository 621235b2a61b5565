"""POST /v1/routing/preview, answered by the router: which route would serve a request, and
why, without calling any provider.

Why here and not in the ingress: the decision needs the classifier, the tenant's policy and
catalog, the bandit's posteriors and the breakers, all of which the router holds (and the
ingress may not import). So a preview travels the normal path (ingress → `llm.requests` →
classification → this router) with `routing.preview` set; the worker runs everything a real
request runs up to the provider call (the claim, the key's re-check, the label, and
`Decider.decide` itself with `preview=True`, which only skips the selection count), then
answers with this explanation as its `done` frame. No attempt starts, so no provider is
called, no breaker probe is taken, no usage is billed.

What the explanation holds: the classification (category, confidence, where it came from),
the routes in the order a real request would try them (the first is the chosen one) with
their posterior mean, estimated cost and latency, and every other candidate with what
excluded it: the policy, the key's models, the request's provider pin, a capability, the
context window, an open breaker, a disabled tenant provider, or the mode. When several
routes share a tier, the order is one Thompson draw, as for a real request: another request
may draw otherwise (the posterior means say how likely)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from topics.catalog import Catalog, Model
from topics.errors import SwitchyardError
from topics.messages import RequestEnvelope
from topics.routing_policy import (
    AUTO,
    GENERAL_CATEGORY,
    RoutingPolicy,
    exclusion,
    pin_category,
)
from topics.tenant_providers import TenantRoutes, route_id
from workers.router.decide import (
    SLO_MS,
    Decider,
    Decision,
    min_tokens_needed,
    required_capabilities,
)
from workers.router.latency import LatencyTracker

# What a cost estimate assumes a request without max_tokens produces.
DEFAULT_OUTPUT_TOKENS = 256
_CHARS_PER_TOKEN = 4  # English's average: an estimate, not the context-window bound

RoutesLookup = Callable[[str], Awaitable[TenantRoutes]]


class Previewer:
    def __init__(self, decider: Decider, latency: LatencyTracker,
                 tenant_routes: RoutesLookup | None = None) -> None:
        self._decider = decider
        self._latency = latency
        self._tenant_routes = tenant_routes

    async def explain(self, env: RequestEnvelope,
                      key_models: frozenset[str] | None) -> dict[str, Any]:
        policy = await self._decider.policy_for(env.tenant_id)
        routes = (await self._tenant_routes(env.tenant_id) if self._tenant_routes is not None
                  else TenantRoutes(await self._decider.catalog_for(env.tenant_id)))
        catalog = routes.catalog
        category = pin_category(policy, env.category, env.confidence) or GENERAL_CATEGORY
        decision: Decision | None = None
        refusal: SwitchyardError | None = None
        try:
            decision = await self._decider.decide(env, key_models, preview=True)
        except SwitchyardError as exc:
            refusal = exc
        ranked = list(decision.ranked) if decision is not None else []
        eligible = await self._eligible(env, category, ranked)
        excluded = await self._excluded(env, policy, routes, key_models,
                                        {m.id for m in ranked})
        out: dict[str, Any] = {
            "object": "routing.preview",
            "model": str(env.body.get("model")),
            "semantic_classification": self._classification(env, category),
            "category": env.category or GENERAL_CATEGORY,
            "confidence": 1.0 if env.confidence is None else env.confidence,
            "mode": decision.mode if decision is not None else None,
            "eligible": eligible,
            "alternatives": eligible[1:],
            "excluded": excluded,
            "reason": _reason(env, policy, decision, eligible, refusal, catalog),
        }
        if eligible:
            chosen = eligible[0]
            out |= {"selected_provider": chosen["provider"], "selected_model": chosen["model"],
                    "selected_route": chosen["route"],
                    "estimated_cost_usd": chosen["estimated_cost_usd"],
                    "estimated_latency_ms": chosen["estimated_latency_ms"]}
        else:
            out |= {"selected_provider": None, "selected_model": None, "selected_route": None}
        if refusal is not None:
            out["error"] = refusal.to_frame_data()
        return out

    def _classification(self, env: RequestEnvelope, routed_as: str) -> dict[str, Any]:
        source = ("classifier" if env.classifier_version is not None
                  else "client" if env.category is not None else "none")
        return {"category": env.category or GENERAL_CATEGORY, "routed_as": routed_as,
                "confidence": 1.0 if env.confidence is None else env.confidence,
                "source": source, "classifier_version": env.classifier_version}

    async def _eligible(self, env: RequestEnvelope, category: str,
                        ranked: list[Model]) -> list[dict[str, Any]]:
        if not ranked:
            return []
        ids = [m.id for m in ranked]
        posteriors = await self._decider.posteriors.get(category, ids)
        observed = {s.route: s.latency_p50_ms
                    for s in await self._decider.store.stats([category], ids)}
        prompt, output = _token_estimate(env.body)
        streamed = bool(env.body.get("stream"))
        out = []
        for rank, m in enumerate(ranked):
            p = posteriors[m.id]
            latency = self._latency.percentile(m.id, streamed, 50) or observed.get(m.id)
            out.append({
                "rank": rank, "route": m.id, "provider": m.provider,
                "model": m.upstream_model, "score": round(p.mean, 6),
                "posterior": {"alpha": round(p.alpha, 6), "beta": round(p.beta, 6),
                              "mean": round(p.mean, 6)},
                "estimated_cost_usd": str(m.cost_usd(prompt, output, 0)),
                "estimated_latency_ms": round(latency if latency is not None
                                              else SLO_MS.get(m.class_, 10_000.0), 3),
                "latency_source": "observed" if latency is not None else "slo",
            })
        return out

    async def _excluded(self, env: RequestEnvelope, policy: RoutingPolicy,
                        routes: TenantRoutes, key_models: frozenset[str] | None,
                        kept: set[str]) -> list[dict[str, Any]]:
        catalog = routes.catalog
        requested = str(env.body.get("model"))
        candidates = _candidates(catalog, policy, env, requested)
        out: list[dict[str, Any]] = []
        for p in routes.providers:
            if p.enabled:
                continue
            for dm in p.models:
                rid = route_id(p.id, dm.name)
                if requested == AUTO or requested in (dm.name, f"{p.name}/{dm.name}", rid):
                    out.append(_exclusion(rid, p.id, dm.name, "provider_disabled",
                                          f"the tenant's provider {p.name!r} is disabled"))
        rest = [m for m in candidates if m.id not in kept]
        if not rest:
            return out
        open_ids = set(m.id for m in rest) - await self._decider.breakers.closed_or_probing(
            [m.id for m in rest])
        key_ids = (None if key_models is None
                   else {m.id for name in key_models for m in catalog.routes_of(name)})
        needs = required_capabilities(env.body)
        tokens = min_tokens_needed(env.body)
        pin = env.routing.allowed_providers
        for m in rest:
            why = exclusion(catalog, policy, m)
            if why is not None:
                code, reason = "policy", f"the tenant's routing policy excludes it: {why}"
            elif key_ids is not None and m.id not in key_ids:
                code, reason = "model_not_allowed", "not among this API key's allowed models"
            elif pin and m.provider not in pin:
                code, reason = ("request_policy",
                                f"the request's policy.provider pins {', '.join(pin)}")
            elif not needs <= set(m.capabilities):
                lacks = ", ".join(sorted(needs - set(m.capabilities)))
                code, reason = "capability", f"it does not support {lacks}"
            elif tokens > m.context_window:
                code, reason = ("context_window", f"the prompt and max_tokens need at least "
                                f"{tokens} tokens; its context window is {m.context_window}")
            elif m.id in open_ids:
                code, reason = "breaker_open", "its circuit breaker is open"
            else:
                code, reason = "mode", "the request's mode does not use it"
            out.append(_exclusion(m.id, m.provider, m.upstream_model, code, reason))
        return out


def _exclusion(route: str, provider: str, model: str, code: str,
               reason: str) -> dict[str, Any]:
    return {"route": route, "provider": provider, "model": model, "code": code,
            "reason": reason}


def _candidates(catalog: Catalog, policy: RoutingPolicy, env: RequestEnvelope,
                requested: str) -> list[Model]:
    """Every route routing considers for the request before its rules: the named model's
    routes, its fallbacks' and, with substitution, its class's; for "auto", every chat
    route."""
    if requested == AUTO:
        return [m for m in catalog.models if m.kind == "chat"]
    found = list(catalog.routes_of(requested))
    if not found:
        return []
    chain = env.routing.fallbacks
    if chain is None:
        chain = list(policy.fallbacks.get(requested, ()))
    for name in chain:
        found += catalog.routes_of(name)
    if policy.allow_substitution and found[0].kind == "chat":
        found += [m for m in catalog.models if m.kind == "chat"
                  and m.class_ == found[0].class_]
    return list({m.id: m for m in reversed(found)}.values())[::-1]  # first of each id


def _token_estimate(body: dict[str, Any]) -> tuple[int, int]:
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    output = body.get("max_completion_tokens") or body.get("max_tokens")
    return (max(chars // _CHARS_PER_TOKEN, 1),
            output if isinstance(output, int) and output > 0 else DEFAULT_OUTPUT_TOKENS)


def _reason(env: RequestEnvelope, policy: RoutingPolicy, decision: Decision | None,
            eligible: list[dict[str, Any]], refusal: SwitchyardError | None,
            catalog: Catalog) -> str:
    if refusal is not None or decision is None or not eligible:
        return (f"no route: {refusal.message}" if refusal is not None
                else "no route can serve this request")
    chosen = eligible[0]
    requested = str(env.body.get("model"))
    how = (f"{requested!r} was named" if requested != AUTO
           else f"'auto' for category {decision.category!r}")
    if requested == AUTO and env.category is not None and decision.category != env.category:
        how += (f" (the label {env.category!r} at confidence {env.confidence} is under the "
                f"policy's pin_min_confidence {policy.pin_min_confidence}: it pins nothing)")
    if len(eligible) == 1:
        return f"{how}; {chosen['route']} is the only eligible route"
    if requested != AUTO and not catalog.is_shared_name(requested) \
            and chosen["route"] in decision.primary:
        return (f"{how}; its own route {chosen['route']} comes first, the other "
                f"{len(eligible) - 1} are its failover order")
    return (f"{how}; a Thompson draw over {len(eligible)} eligible routes ranked "
            f"{chosen['route']} first (posterior mean {chosen['score']})")

