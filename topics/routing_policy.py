"""A tenant's routing policy: which routes the router may choose for that tenant's requests.

The model is the contract (stored as JSON in PostgreSQL, served and replaced over HTTP); the
two functions are pure and shared by the ingress (validation) and the router (eligibility):

- `validate_against(policy, catalog)` checks the names a policy uses against the catalog.
- `route_tiers(catalog, policy, category=..., requested_model=..., fallbacks=...)` is what
  the router may serve one request with, in the order it tries them (`eligible_routes`,
  the same flattened). It never returns nothing: when the policy leaves nothing it raises
  the 403 that says which rule excluded what.

The default policy is `RoutingPolicy()`: equal weights, every provider and model, no price
ceiling, no pinned routes, mode `auto`, no substitution, i.e. what the gateway did before
policies existed.

The other files of the feature: `state/routing_policy.py` stores policies in PostgreSQL and
caches them for the router; `ingress/routing_policy.py` serves GET, PUT and DELETE
/v1/routing/policy; `workers/router/decide.py` applies a tenant's policy to each request.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from decimal import Decimal
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictStr,
    TypeAdapter,
)
from typing_extensions import TypedDict

from topics.bandit import ObjectiveWeights
from topics.catalog import Catalog, Model
from topics.errors import Forbidden, InvalidRequest, NotFound
from topics.messages import CouncilOutput, Mode
from topics.response_cache import CachePolicy

AUTO = "auto"  # the model name that asks the router to choose

Category = Literal["code", "math", "creative_writing", "summarization",
                   "information_extraction", "classification", "question_answering",
                   "brainstorming"]
CATEGORIES: tuple[str, ...] = get_args(Category)
# Where the learning of requests without a category goes (pinned, hinted-off, embeddings).
GENERAL_CATEGORY = "general"

# On dev, 96 % of the cascade's labels are at least this sure, and 88.6 % of those are right
# (docs/routing.md#pins-and-confidence).
DEFAULT_PIN_MIN_CONFIDENCE = 0.5

MAX_LIST_ITEMS = 256  # far more than the catalog holds; bounds what a PUT can store
MAX_NAME_CHARS = 128

# Strict scalars: "1" is not a weight and 1 is not `true`. Containers stay lax so a JSON
# array validates into an (immutable) tuple.
Weight = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Name = Annotated[StrictStr, Field(min_length=1, max_length=MAX_NAME_CHARS)]
Confidence = Annotated[StrictFloat, Field(ge=0, le=1, allow_inf_nan=False)]


def _no_bool(value: object) -> object:
    # Decimal's lax mode would take `true` as 1; a price is never a boolean.
    if isinstance(value, bool):
        raise ValueError("must be a number or a decimal string")
    return value


def _unique(names: tuple[str, ...] | None) -> tuple[str, ...] | None:
    seen: set[str] = set()
    for name in names or ():
        if name in seen:
            raise ValueError(f"{name!r} is listed twice")
        seen.add(name)
    return names


# Money is Decimal; a number or a decimal string ("2.50") is accepted, a string is returned.
Price = Annotated[Decimal, BeforeValidator(_no_bool),
                  Field(gt=0, allow_inf_nan=False, max_digits=18, decimal_places=6)]
NameList = Annotated[tuple[Name, ...] | None,
                     Field(default=None, min_length=1, max_length=MAX_LIST_ITEMS),
                     AfterValidator(_unique)]
MAX_FALLBACKS = 8  # attempts are bounded anyway; a longer chain is a mistake
FallbackChain = Annotated[tuple[Name, ...], Field(min_length=1, max_length=MAX_FALLBACKS),
                          AfterValidator(_unique)]


class _StrictWeights(TypedDict, total=False):
    cost: Weight
    latency: Weight
    quality: Weight


_STRICT_WEIGHTS = TypeAdapter(_StrictWeights)


def _strict_weights(value: object) -> object:
    # A policy's weights are finite numbers, never "1" or true (a request's are laxer, see
    # ObjectiveWeights); an error names the field, e.g. `weights.cost`. Unknown fields are
    # left to ObjectiveWeights, which refuses them.
    if isinstance(value, dict):
        _STRICT_WEIGHTS.validate_python(value)
    return value


def _some_objective(weights: ObjectiveWeights) -> ObjectiveWeights:
    if not all(map(math.isfinite, (weights.cost, weights.latency, weights.quality))):
        raise ValueError("cost, latency and quality must be finite")  # built in Python only
    if weights.cost == weights.latency == weights.quality == 0:
        raise ValueError("at least one of cost, latency and quality must be above 0")
    return weights


# The relative importance of cost, latency and quality in the router's choice.
PolicyObjective = Annotated[ObjectiveWeights, BeforeValidator(_strict_weights),
                            AfterValidator(_some_objective)]


class RoutingPolicy(BaseModel):
    """One tenant's policy. Every field is optional; what is left out takes its default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    weights: PolicyObjective = ObjectiveWeights()
    # None: every provider / model of the catalog. A list: only those (ids or aliases).
    allowed_providers: NameList = None
    allowed_models: NameList = None
    # A model is eligible only if max(input, output) list price per million tokens <= this.
    price_ceiling_per_mtok: Price | None = None
    # For `model: "auto"`: the model to use for a category, instead of the router's choice.
    pinned_routes: dict[Category, Name] = Field(default_factory=dict)
    # A pin applies only when the classifier's confidence in the label is at least this (a
    # client's category hint always applies): an unsure label is routed as `general`.
    pin_min_confidence: Confidence = DEFAULT_PIN_MIN_CONFIDENCE
    default_mode: Mode = "auto"
    # Council mode: the model that judges the members' answers, and what is returned.
    judge_model: Name | None = None
    council_output: CouncilOutput = "winner"
    # A named model may be served by another eligible chat model of its class (after the
    # named model and its fallbacks, ranked by the router).
    allow_substitution: StrictBool = False
    # Per named model, what serves it, in order, when it cannot: {"gpt-4o": ["claude-opus"]}.
    # A request's own `models` list takes the place of this one.
    fallbacks: dict[Name, FallbackChain] = Field(default_factory=dict)
    # The response cache (`topics/response_cache.py`, docs/cache.md): read by the ingress
    # only; routers ignore it.
    cache: CachePolicy = CachePolicy()

    def public(self) -> dict[str, Any]:
        """The JSON shape (what a PUT accepts): the price as a decimal string."""
        return self.model_dump(mode="json")


def unit_price(model: Model) -> Decimal:
    """What the price ceiling compares: the larger of the input and output list prices per
    million tokens (cached input is never dearer than input)."""
    return max(model.input_per_mtok, model.output_per_mtok)


def _resolved_ids(catalog: Catalog, names: Iterable[str]) -> set[str]:
    # Names that left the catalog since the policy was stored match nothing.
    return {m.id for m in map(catalog.model, names) if m is not None}


def _allowed_ids(catalog: Catalog, policy: RoutingPolicy) -> set[str] | None:
    return (None if policy.allowed_models is None
            else _resolved_ids(catalog, policy.allowed_models))


def _exclusion(policy: RoutingPolicy, model: Model, allowed_ids: set[str] | None) -> str | None:
    """Why `policy` excludes `model`, or None if it admits it."""
    if policy.allowed_providers is not None and model.provider not in policy.allowed_providers:
        return f"its provider {model.provider!r} is not in allowed_providers"
    if allowed_ids is not None and model.id not in allowed_ids:
        return "it is not in allowed_models"
    ceiling = policy.price_ceiling_per_mtok
    if ceiling is not None and unit_price(model) > ceiling:
        return (f"its price ({unit_price(model)} per million tokens) is above "
                f"price_ceiling_per_mtok ({ceiling})")
    return None


def exclusion(catalog: Catalog, policy: RoutingPolicy, model: Model) -> str | None:
    """Why the policy's provider, model and price rules exclude `model` (None: they admit
    it): what a routing preview reports."""
    return _exclusion(policy, model, _allowed_ids(catalog, policy))


def admits(catalog: Catalog, policy: RoutingPolicy, model: Model) -> bool:
    """Whether the policy's provider, model and price rules let `model` through."""
    return _exclusion(policy, model, _allowed_ids(catalog, policy)) is None


def within_key_models(catalog: Catalog, policy: RoutingPolicy,
                      key_models: frozenset[str]) -> RoutingPolicy:
    """`policy` narrowed to the models an API key is limited to (`Principal.allowed_models`,
    `topics/identity.py`): its `allowed_models` become those of the key that the policy
    admits. With "auto" the router then chooses among the key's models only, and no fallback
    or substitution leads outside them. Raises 403 `model_not_allowed` when the key's models
    and the policy have none in common."""
    # A key's model is that model from whichever provider serves it (every route of it).
    ids = {m.id for name in key_models for m in catalog.routes_of(name)}
    admitted = _allowed_ids(catalog, policy)
    if admitted is not None:
        ids &= admitted
    if not ids:
        raise Forbidden("this API key's allowed models and the tenant's routing policy have "
                        "no model in common", code="model_not_allowed", param="model")
    return policy.model_copy(update={"allowed_models": tuple(sorted(ids))})


def validate_against(policy: RoutingPolicy, catalog: Catalog) -> None:
    """Raise the 400 naming the field if the policy names what the catalog does not have
    (`unknown_provider`, `unknown_model`), pins a route it cannot use, or admits no model
    at all (`policy_conflict`). A shape problem (e.g. weights all zero) never gets here: the
    model refuses it with a 422."""
    for i, provider in enumerate(policy.allowed_providers or ()):
        if provider not in catalog.providers:
            raise InvalidRequest(
                f"allowed_providers.{i}: unknown provider {provider!r}; known providers: "
                f"{', '.join(sorted(catalog.providers))}",
                code="unknown_provider", param=f"allowed_providers.{i}")
    for i, name in enumerate(policy.allowed_models or ()):
        if catalog.model(name) is None:
            raise _unknown_model(name, f"allowed_models.{i}")
    allowed = _allowed_ids(catalog, policy)
    for category, name in policy.pinned_routes.items():
        param = f"pinned_routes.{category}"
        model = catalog.model(name)
        if model is None:
            raise _unknown_model(name, param)
        if model.kind != "chat":
            raise InvalidRequest(f"{param}: {name!r} is an embeddings model; a pinned route "
                                 "must be a chat model", code="policy_conflict", param=param)
        if (why := _exclusion(policy, model, allowed)) is not None:
            raise InvalidRequest(f"{param}: this policy excludes {name!r}: {why}",
                                 code="policy_conflict", param=param)
    for name, chain in policy.fallbacks.items():
        model = catalog.model(name)
        if model is None:
            raise _unknown_model(name, f"fallbacks.{name}")
        for i, fallback in enumerate(chain):
            check_fallback(catalog, model, fallback, f"fallbacks.{name}.{i}")
    if policy.judge_model is not None:
        judge = catalog.model(policy.judge_model)
        if judge is None:
            raise _unknown_model(policy.judge_model, "judge_model")
        # Not held to allowed_models: naming the judge is the tenant's permission to call it.
        if judge.kind != "chat":
            raise InvalidRequest(f"judge_model: {policy.judge_model!r} is an embeddings model; "
                                 "a judge must be a chat model", code="policy_conflict",
                                 param="judge_model")
    if not any(_exclusion(policy, m, allowed) is None for m in catalog.models):
        param = ("price_ceiling_per_mtok" if policy.price_ceiling_per_mtok is not None
                 else "allowed_models" if policy.allowed_models is not None
                 else "allowed_providers")
        raise InvalidRequest(
            "this policy admits no model of the catalog: allowed_providers, allowed_models "
            "and price_ceiling_per_mtok together exclude every one",
            code="policy_conflict", param=param)


def check_fallback(catalog: Catalog, model: Model, name: str, param: str) -> Model:
    """The catalog's model for a fallback `name` of `model`, or the error naming `param`."""
    fallback = catalog.model(name)
    if fallback is None:
        raise _unknown_model(name, param)
    if fallback.kind != model.kind:
        raise InvalidRequest(f"{param}: {name!r} is a {fallback.kind} model and cannot serve "
                             f"the {model.kind} model {model.id!r}", code="wrong_model_kind",
                             param=param)
    return fallback


def _unknown_model(name: str, param: str) -> InvalidRequest:
    return InvalidRequest(f"{param}: unknown model {name!r}; GET /v1/models lists them",
                          code="unknown_model", param=param)


def eligible_routes(catalog: Catalog, policy: RoutingPolicy, *, category: str | None,
                    requested_model: str, fallbacks: tuple[str, ...] | None = None
                    ) -> list[Model]:
    """`route_tiers`, flattened: every route the router may use, in tier order."""
    return [m for tier in route_tiers(catalog, policy, category=category,
                                      requested_model=requested_model, fallbacks=fallbacks)
            for m in tier]


def pin_category(policy: RoutingPolicy, category: str | None,
                 confidence: float | None) -> str | None:
    """The category whose pinned route may serve the request: its label when the classifier
    was sure enough (`pin_min_confidence`), or a client's hint (no confidence); else none,
    and the request is routed as `general` by the router's choice."""
    if category is None or confidence is None or confidence >= policy.pin_min_confidence:
        return category
    return None


def route_tiers(catalog: Catalog, policy: RoutingPolicy, *, category: str | None,
                requested_model: str, fallbacks: tuple[str, ...] | None = None
                ) -> list[tuple[Model, ...]]:
    """The models the router may serve this request with, as tiers tried in order; the router
    ranks the routes within a tier (the bandit) and never across tiers. Never empty.

    - `requested_model == "auto"`: one tier, the category's pinned route alone if the policy
      has one and it is still eligible; else every eligible chat model (the router chooses).
    - A named model (id or alias): that model first, alone; then the other providers' routes
      of the same model (catalog `serves`); then each fallback in order (the request's own
      `fallbacks`, else the policy's `fallbacks` for that model), each followed by its other
      providers' routes; then, with `allow_substitution`, every other eligible chat model of
      its class. A name several providers serve (a `serves` name) is one tier of all of them.
      Embeddings models are never substituted (another model's vectors are incompatible),
      but may be named as fallbacks.

    Eligible: admitted by allowed_providers, allowed_models and the price ceiling
    (`unit_price(model) <= price_ceiling_per_mtok`). Raises 404 `model_not_found` for a name
    not in the catalog, 403 `model_not_allowed` when the policy leaves no model for a named
    one, 403 `no_eligible_route` when it leaves none for "auto" (a stored policy outlived
    the catalog's models)."""
    allowed = _allowed_ids(catalog, policy)
    if requested_model == AUTO:
        chat = [m for m in catalog.models if m.kind == "chat"
                and _exclusion(policy, m, allowed) is None]
        if not chat:
            raise Forbidden("the tenant's routing policy admits no chat model of the catalog",
                            code="no_eligible_route", param="model")
        pin = next((name for c, name in policy.pinned_routes.items() if c == category), None)
        pinned = catalog.model(pin) if pin is not None else None
        # A pin that stopped being eligible (catalog changed) falls back to the router's choice.
        # By identity: pydantic's == would compare every field of every model, per request.
        return [(pinned,) if pinned is not None and any(m is pinned for m in chat)
                else tuple(chat)]
    model = catalog.model(requested_model)
    if model is None:
        raise NotFound(f"model {requested_model!r} does not exist; GET /v1/models lists them",
                       code="model_not_found", param="model")
    seen: set[str] = set()

    def tier(models: Iterable[Model]) -> tuple[Model, ...]:
        fresh = tuple(m for m in models if m.id not in seen
                      and _exclusion(policy, m, allowed) is None)
        seen.update(m.id for m in models)
        return fresh

    named = catalog.routes_of(requested_model)
    tiers = [tier(named)] if catalog.is_shared_name(requested_model) \
        else [tier(named[:1]), tier(named[1:])]
    chain = fallbacks if fallbacks is not None else policy.fallbacks.get(requested_model)
    if chain is None:
        chain = next((c for name, c in policy.fallbacks.items()
                      if catalog.model(name) is model), ())
    for name in chain:
        routes = catalog.routes_of(name)
        tiers += [tier(routes[:1]), tier(routes[1:])]
    if policy.allow_substitution and model.kind == "chat":
        tiers.append(tier(m for m in catalog.models
                          if m.kind == "chat" and m.class_ == model.class_))
    tiers = [t for t in tiers if t]
    if not tiers:
        why = _exclusion(policy, model, allowed)
        substitution = ("and embeddings models are never substituted" if model.kind != "chat"
                        else f"and no other {model.class_} model is eligible"
                        if policy.allow_substitution else "and allow_substitution is off")
        raise Forbidden(f"the tenant's routing policy does not allow {requested_model!r}: "
                        f"{why}, {substitution}", code="model_not_allowed", param="model")
    return tiers
