"""Which route serves a request, and what its outcome teaches.

The tenant's routing policy (PostgreSQL, cached) decides which routes are eligible; among
several, a Thompson draw over the Beta posteriors shared in Redis (read through a ≤ 100 ms
cache) picks one, per prompt category. The outcome of every attempt (success, latency
against the route's SLO, cost against the cheapest eligible route) updates the posterior,
once per attempt however often Kafka redelivers it.

Where routing uses the bandit, whose maths is `topics/bandit.py` and whose posteriors
`state/bandit.py` stores; and the routing policy, whose model and eligibility rules are
`topics/routing_policy.py` and whose store and cache `state/routing_policy.py`.

A tenant's catalog (`catalogs`, `state/tenant_providers.py`) is the shared one plus the routes
of the providers it registered: they are chosen, excluded and learnt about like any other.
`decide(..., preview=True)` is the same decision without its side effect (the selection
count): `workers/router/preview.py` explains it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from state.bandit import CachedPosteriors, PosteriorStore
from state.breakers import Breakers
from state.degraded import Degraded
from state.routing_policy import PolicyCache
from state.runtime import outage
from topics.bandit import ObjectiveWeights, Outcome, outcome_weight, reward
from topics.catalog import Catalog, Model
from topics.errors import InvalidRequest, NotFound, Unavailable
from topics.messages import CouncilOutput, Mode, RequestEnvelope
from topics.routing_policy import (
    AUTO,
    GENERAL_CATEGORY,
    RoutingPolicy,
    admits,
    pin_category,
    route_tiers,
    within_key_models,
)
from topics.settings import RouterSettings
from topics.tracing import Span, Tracing
from workers.router.metrics import RouterMetrics
from workers.router.sampler import ThompsonSampler

# Latency a route should meet before its latency score starts to fall, by model class:
# time to first token for streams, whole answer otherwise.
SLO_MS = {"fast": 3_000.0, "frontier": 10_000.0, "code": 10_000.0, "reasoning": 30_000.0,
          "embedding": 2_000.0}

log = logging.getLogger(__name__)

CatalogLookup = Callable[[str], Awaitable[Catalog]]  # a tenant's catalog, by tenant id


@dataclass(frozen=True, slots=True)
class ModeDefaults:
    race_routes: int  # speculative
    hedge_routes: int  # hedged: the first route and at most this many minus one hedges
    council_members: int
    judge_model: str | None  # the council's judge when neither request nor policy names one

    @classmethod
    def from_settings(cls, router: RouterSettings) -> ModeDefaults:
        return cls(race_routes=router.race_routes, hedge_routes=router.hedge_routes,
                   council_members=router.council_members,
                   judge_model=router.council_judge_model)


@dataclass(frozen=True, slots=True)
class Decision:
    ranked: tuple[Model, ...]  # the selectable routes, best first (failover order)
    category: str
    weights: ObjectiveWeights
    # What the cost score compares against: every chat route the tenant's policy admits, the
    # same set whatever this request named, so that every outcome on a route is scored alike
    # (a one-route comparison would call any route "the cheapest").
    peers: tuple[Model, ...]
    mode: Mode = "auto"
    width: int = 1  # routes raced or hedged at most; council members
    judge: Model | None = None
    council_output: CouncilOutput = "winner"
    # The routes that answer as the request asked: the named model's own routes, or for
    # "auto" the router's first choice(s). An answer from any other is a fallback.
    primary: frozenset[str] = frozenset()

    def is_fallback(self, model: Model) -> bool:
        return model.id not in self.primary


class Decider:
    def __init__(self, catalog: Catalog, policies: PolicyCache, store: PosteriorStore,
                 posteriors: CachedPosteriors, sampler: ThompsonSampler, breakers: Breakers,
                 *, feedback_rate: float, defaults: ModeDefaults,
                 degraded: Degraded | None = None, tracing: Tracing | None = None,
                 metrics: RouterMetrics | None = None,
                 catalogs: CatalogLookup | None = None) -> None:
        self._catalog = catalog
        self._catalogs = catalogs  # None: every tenant routes on `catalog` alone
        self._policies = policies
        self._store = store
        self._posteriors = posteriors
        self._sampler = sampler
        self._breakers = breakers
        self._feedback_rate = feedback_rate
        self._defaults = defaults
        self._degraded = degraded or Degraded()
        self._counting: set[asyncio.Task[None]] = set()
        self._tracing = tracing or Tracing()
        self._metrics = metrics

    @property
    def breakers(self) -> Breakers:
        return self._breakers

    @property
    def posteriors(self) -> CachedPosteriors:
        return self._posteriors

    @property
    def store(self) -> PosteriorStore:
        return self._store

    async def catalog_for(self, tenant_id: str) -> Catalog:
        """The tenant's catalog: the shared one with its registered providers' routes."""
        return self._catalog if self._catalogs is None else await self._catalogs(tenant_id)

    async def policy_for(self, tenant_id: str) -> RoutingPolicy:
        return await self._policies.policy_for(tenant_id)

    async def decide(self, env: RequestEnvelope, key_models: frozenset[str] | None = None,
                     *, preview: bool = False) -> Decision:
        """`key_models`: the models the request's API key is limited to (None: any); the
        routes, "auto"'s choice included, stay among them. `preview`: nothing is counted."""
        with self._tracing.span("route decision") as span:
            decision = await self._decide(env, key_models, span, preview=preview)
            if span.is_recording():
                span.set_attributes({
                    "switchyard.category": decision.category,
                    "switchyard.mode": decision.mode, "switchyard.width": decision.width,
                    "switchyard.routing.candidates": [m.id for m in decision.ranked],
                    "switchyard.routing.chosen": decision.ranked[0].id if decision.ranked
                    else ""})
            return decision

    async def _decide(self, env: RequestEnvelope, key_models: frozenset[str] | None,
                      span: Span, *, preview: bool) -> Decision:
        policy = await self._policies.policy_for(env.tenant_id)
        catalog = await self.catalog_for(env.tenant_id)
        fallbacks = env.routing.fallbacks
        # An unsure label neither pins a route nor teaches its category's posteriors.
        routed_as = pin_category(policy, env.category, env.confidence)
        tiers = route_tiers(catalog, policy if key_models is None
                            else within_key_models(catalog, policy, key_models),
                            category=routed_as,
                            requested_model=str(env.body.get("model")),
                            fallbacks=tuple(fallbacks) if fallbacks is not None else None)
        routes = [m for t in tiers for m in t]
        peers = tuple(m for m in catalog.models
                      if m.kind == routes[0].kind and admits(catalog, policy, m))
        if env.routing.allowed_providers:  # the request's own pin (seed `policy.provider`)
            routes = [m for m in routes if m.provider in env.routing.allowed_providers] \
                or routes
        mode = env.routing.mode or policy.default_mode
        if env.endpoint == "embeddings" and mode not in ("auto", "fixed"):
            raise InvalidRequest(f"mode {mode!r} serves chat completions only; embeddings "
                                 "use auto or fixed", code="unsupported_mode", param="mode")
        if mode == "fixed":
            routes = routes[:1]
        elif len(routes) > 1:
            routes = _capable(routes, env.body)
        routes = _fitting(routes, env.body)
        width = self._width(mode, env.routing.routes, len(routes))
        judge = self._judge(env, policy, catalog) if mode == "council" else None
        category = routed_as or GENERAL_CATEGORY
        weights = _weights(env.routing.weights, policy.weights)
        routes = await self._selectable(routes)
        if len(routes) > 1:
            routes = await self._ranked(category, routes, tiers, span)
        if len(routes) > 1 and not preview:
            if self._metrics is not None:
                self._metrics.drawn(routes[0].id, category)
            # A stats-only counter: counted alongside the provider call, not before it.
            task = asyncio.create_task(self._store.note_selection(category, routes[0].id))
            self._counting.add(task)
            task.add_done_callback(self._counted)
        # Asked for: the named model's routes, and whatever a race or hedge starts at once.
        named = str(env.body.get("model")) != AUTO
        primary = {m.id for m in tiers[0]} if named else set()
        if not named or width > 1:
            primary.update(m.id for m in routes[:width])
        return Decision(tuple(routes), category, weights, peers, mode=mode, width=width,
                        judge=judge,
                        council_output=env.routing.council_output or policy.council_output,
                        primary=frozenset(primary))

    async def _ranked(self, category: str, routes: list[Model],
                      tiers: list[tuple[Model, ...]], span: Span) -> list[Model]:
        """`routes` in the order they are tried: tier by tier, each tier by one Thompson
        draw (`topics/bandit.py`) over its routes' posteriors. One tier ("auto", or a name
        several providers serve) is the bandit's choice alone; a named model stays first."""
        posteriors = await self._posteriors.get(category, [m.id for m in routes])
        if self._metrics is not None:
            for route, p in posteriors.items():
                self._metrics.posterior(route, category, p.alpha, p.beta)
        kept = {m.id for m in routes}
        ordered: list[Model] = []
        drawn: list[str] = []
        draws: list[float] = []
        for tier in tiers:
            members = [m for m in tier if m.id in kept]
            if len(members) > 1:
                values = self._sampler.draw([(posteriors[m.id].alpha, posteriors[m.id].beta)
                                             for m in members])
                order = self._sampler.order(values)
                if span.is_recording():
                    drawn += [m.id for m in members]
                    draws += [float(v) for v in values]
                members = [members[i] for i in order]
            ordered += members
        if drawn:
            # The Thompson draws behind the order: what each route sampled, route by route.
            span.set_attributes({"switchyard.routing.drawn_routes": drawn,
                                 "switchyard.routing.draws": draws})
        return ordered

    def _width(self, mode: Mode, requested: int | None, eligible: int) -> int:
        if mode in ("auto", "fixed"):
            return 1
        width = requested or {"speculative": self._defaults.race_routes,
                              "hedged": self._defaults.hedge_routes,
                              "council": self._defaults.council_members}[mode]
        if width > eligible:
            raise InvalidRequest(
                f"{mode} mode needs {width} routes but only {eligible} eligible "
                f"route{'s' if eligible != 1 else ''} can serve this request under the "
                "tenant's routing policy", code="not_enough_routes", param="routes")
        return width

    def _judge(self, env: RequestEnvelope, policy: RoutingPolicy, catalog: Catalog) -> Model:
        name = env.routing.judge_model or policy.judge_model or self._defaults.judge_model
        if name is None:
            raise InvalidRequest("council mode needs a judge model: name one in the request "
                                 "(switchyard.judge_model), the tenant's routing policy "
                                 "(judge_model) or the router's settings",
                                 code="judge_required", param="judge_model")
        judge = catalog.model(name)
        if judge is None or judge.kind != "chat":
            raise NotFound(f"judge model {name!r} is not a chat model of the catalog",
                           code="model_not_found", param="judge_model")
        return judge

    async def _selectable(self, routes: list[Model]) -> list[Model]:
        """The routes whose circuit breaker lets them be chosen: closed, or open past their
        cool-down with a probe slot free (taken only when an attempt starts)."""
        allowed = await self._breakers.closed_or_probing([m.id for m in routes])
        selectable = [m for m in routes if m.id in allowed]
        if not selectable:
            # A probe may try a route again once its cool-down is over: then ask again.
            raise Unavailable("every route that can serve this request is failing: their "
                              "circuit breakers are open", code="circuit_open",
                              retry_after_s=max(1.0, self._breakers.cooldown_s))
        return selectable

    async def drain(self) -> None:
        """Wait for the Redis work a decision started in the background (selection counts,
        posterior and breaker refreshes): the router's lifespan does it before the Redis
        client closes, so nothing opens a connection on a closed client."""
        await asyncio.gather(*self._counting, return_exceptions=True)
        await self._posteriors.drain()
        await self._breakers.drain()

    def _counted(self, task: asyncio.Task[None]) -> None:
        self._counting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("selection count lost: %s", task.exception())  # stats only

    async def learn(self, event_id: str, decision: Decision, model: Model, *, success: bool,
                    latency_ms: float, prompt_tokens: int, completion_tokens: int,
                    cached_tokens: int) -> None:
        cost = float(model.cost_usd(prompt_tokens, completion_tokens, cached_tokens))
        cheapest = min(float(m.cost_usd(prompt_tokens, completion_tokens, cached_tokens))
                       for m in (*decision.peers, model))
        outcome = Outcome(success=success, latency_ms=latency_ms,
                          slo_ms=SLO_MS.get(model.class_, 10_000.0), cost_usd=cost,
                          cheapest_cost_usd=cheapest, quality=None)
        if self._degraded.down:  # not worth a wait of the socket timeout: dropped at once
            self._degraded.note("bandit updates", "outcome not learnt")
            return
        try:
            await self._store.update(
                event_id, decision.category, model.id, reward(outcome, decision.weights),
                success=success, latency_ms=latency_ms,
                # The quality part of the evidence arrives later, as feedback, if at all.
                weight=outcome_weight(outcome, decision.weights, self._feedback_rate))
        except Exception as exc:
            if outage(exc) is None:
                raise
            # Lost: the bandit learns from the outcomes after the outage, as it would from
            # these (one attempt's evidence among many).
            self._degraded.note("bandit updates", "outcome not learnt", exc)


def _capable(routes: list[Model], body: dict[str, Any]) -> list[Model]:
    """The routes that can do what the request needs (tools, JSON, images, streaming)."""
    needs = required_capabilities(body)
    capable = [m for m in routes if needs <= set(m.capabilities)]
    if not capable:
        raise InvalidRequest(f"no eligible model supports {', '.join(sorted(needs))}",
                             code="no_capable_route", param="model")
    return capable


# Characters per token at the high end of real text (English averages about 4): the estimate
# errs low, so a route is skipped up front only when the prompt surely cannot fit; a
# provider's own context-length refusal fails over for the rest (workers/router/execute.py).
_CHARS_PER_TOKEN_HIGH = 6


def _fitting(routes: list[Model], body: dict[str, Any]) -> list[Model]:
    """The routes whose context window can hold the prompt and the requested output."""
    needed = min_tokens_needed(body)
    if needed <= min(m.context_window for m in routes):
        return routes  # the usual case: every route fits
    largest = max(m.context_window for m in routes)
    fitting = [m for m in routes if m.context_window >= needed]
    if not fitting:
        raise InvalidRequest(f"the prompt and max_tokens need at least {needed} tokens, more "
                             f"than the context window of any eligible model (the largest "
                             f"holds {largest})", code="context_length_exceeded",
                             param="messages")
    return fitting


def min_tokens_needed(body: dict[str, Any]) -> int:
    """A low estimate of the tokens a chat request needs: its text at the high end of
    characters per token, plus the output it asks for."""
    chars = 0
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            chars += len(content)
        elif isinstance(content, list):
            chars += sum(len(p["text"]) for p in content
                         if isinstance(p, dict) and isinstance(p.get("text"), str))
    output = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    return chars // _CHARS_PER_TOKEN_HIGH + (output if isinstance(output, int) else 0)


def required_capabilities(body: dict[str, Any]) -> set[str]:
    needs = set()
    if body.get("tools"):
        needs.add("tools")
    if body.get("stream"):
        needs.add("stream")
    response_format = body.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") != "text":
        needs.add("json")
    for message in body.get("messages") or ():
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
                isinstance(p, dict) and p.get("type") == "image_url" for p in content):
            needs.add("vision")
    return needs


def _weights(requested: ObjectiveWeights, tenant: ObjectiveWeights) -> ObjectiveWeights:
    """The request's own weights (seed `policy.optimize_for`) when it set any, else the
    tenant policy's."""
    return requested if requested != ObjectiveWeights() else tenant
