"""The request shapes of the product Switchyard replaces: an optional `policy` object and a
`metadata` object on the body, `content_parts` on messages, and the `X-Tenant-ID` header; and
our own routing extension: a `switchyard` object on the body and the `x-switchyard-mode`
header. The objects are taken off the body (providers would reject them) and travel in the
request envelope instead; `content_parts` become the message's OpenAI content list."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ingress.validation import parse_model
from topics.bandit import ObjectiveWeights
from topics.catalog import Catalog, Model
from topics.errors import Forbidden, InvalidRequest, NotFound, Unprocessable
from topics.identity import Principal
from topics.messages import MODES
from topics.routing_policy import MAX_FALLBACKS, check_fallback

# optimize_for → objective weights (cost, latency, quality) for the router, dumped as the
# envelope's JSON carries them.
_WEIGHTS: dict[str, dict[str, float]] = {
    "balanced": ObjectiveWeights(cost=1.0, latency=1.0, quality=1.0).model_dump(),
    "cost": ObjectiveWeights(cost=1.0, latency=0.2, quality=0.2).model_dump(),
    "latency": ObjectiveWeights(cost=0.2, latency=1.0, quality=0.2).model_dump(),
    "quality": ObjectiveWeights(cost=0.2, latency=0.2, quality=1.0).model_dump(),
}


class Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    provider: str | None = None
    optimize_for: Literal["balanced", "cost", "latency", "quality"] | None = None
    fallback_enabled: bool | None = None
    timeout_ms: int | None = Field(default=None, gt=0)


class Extension(BaseModel):
    """The body's `switchyard` object: how the router executes the request."""

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: str | None = None
    routes: int | None = Field(default=None, ge=1, le=8)
    hedge_percentile: float | None = Field(default=None, gt=0, lt=100)
    judge_model: str | None = None
    council_output: Literal["winner", "synthesis"] | None = None


AUTO = "auto"  # the model name that asks the router to choose
MODE_HEADER = "x-switchyard-mode"


@dataclass(frozen=True, slots=True)
class Admission:
    model: Model | None  # None for "auto": the router chooses
    body: dict[str, Any]  # what goes to the provider: policy and metadata taken off
    routing: dict[str, Any]
    metadata: dict[str, Any] | None
    timeout_ms: int | None


def admit(body: dict[str, Any], catalog: Catalog, kind: Literal["chat", "embedding"],
          owner: Principal, tenant_header: str | None,
          mode_header: str | None = None) -> Admission:
    """Resolve the model under the request's policy, or raise the 4xx that says why not."""
    if tenant_header is not None and tenant_header != owner.tenant_id:
        raise Forbidden(f"this API key cannot act for tenant {tenant_header!r}",
                        code="tenant_mismatch", param="X-Tenant-ID")
    body = dict(body)
    if owner.allowed_models is not None:
        # A key limited to some models names one of them (a chain too); with `auto` the
        # router chooses among them (`topics/routing_policy.py` `within_key_models`).
        if (model := str(body.get("model"))) != AUTO:
            owner.require_model(model)
        for name in body.get("models") or ():
            owner.require_model(str(name))
    policy = _policy(body.pop("policy", None))
    extension = _extension(body.pop("switchyard", None), mode_header, catalog)
    admission = _admit(body, catalog, kind, policy)
    if extension:
        admission.routing.update(extension)
    return admission


def fold_content_parts(body: dict[str, Any]) -> dict[str, Any]:
    """The seed shape's `messages[].content_parts` (a list of OpenAI content parts) folded
    into each message's `content` list, after its text: what every dialect translates, and
    what the validation that follows checks (image sizes included). `body` itself when no
    message has any (the common case: nothing is copied)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not any(
            isinstance(m, dict) and "content_parts" in m for m in messages):
        return body
    folded = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "content_parts" not in message:
            folded.append(message)
            continue
        message = dict(message)
        parts = message.pop("content_parts")
        if parts is not None and (not isinstance(parts, list)
                                  or not all(isinstance(p, dict) for p in parts)):
            raise Unprocessable("content_parts must be a list of content part objects",
                                code="invalid_field", param=f"messages.{i}.content_parts")
        content = message.get("content")
        if parts and (content is None or isinstance(content, str | list)):
            # (Content of any other type is left for the validation to refuse.)
            before = ([{"type": "text", "text": content}] if isinstance(content, str) and content
                      else content if isinstance(content, list) else [])
            message["content"] = [*before, *parts]
        folded.append(message)
    return {**body, "messages": folded}


def _admit(body: dict[str, Any], catalog: Catalog, kind: Literal["chat", "embedding"],
           policy: Policy) -> Admission:
    metadata = body.pop("metadata", None)
    if metadata is not None and not isinstance(metadata, dict):
        raise Unprocessable("metadata must be an object", code="invalid_field",
                            param="metadata")
    chain = body.pop("models", None)
    name = str(body.get("model"))
    if name == AUTO and kind == "chat":
        if chain is not None:
            raise InvalidRequest("models (a fallback chain) needs a named model; with "
                                 "'auto' the router chooses among every eligible model",
                                 code="invalid_field", param="models")
        # The router chooses, per category, under the tenant's routing policy.
        if policy.provider is not None and policy.provider not in catalog.providers:
            raise InvalidRequest(f"policy.provider {policy.provider!r} is not a provider",
                                 code="unknown_provider", param="policy.provider")
        return Admission(model=None, body=body, routing=_routing(policy, mode=None),
                         metadata=metadata, timeout_ms=policy.timeout_ms)
    model = catalog.model(name)
    if model is None:
        raise NotFound(f"model {name!r} does not exist; GET /v1/models lists them",
                       code="model_not_found", param="model")
    if model.kind != kind:
        route = "/v1/embeddings" if model.kind == "embedding" else "/v1/chat/completions"
        raise InvalidRequest(f"model {name!r} is a {model.kind} model; use {route}",
                             code="wrong_model_kind", param="model")
    if policy.provider is not None:
        model = _pin(model, policy.provider, catalog)
    routing = _routing(policy, mode="fixed" if policy.provider else None)
    if chain is not None:
        routing["fallbacks"] = _fallbacks(chain, name, model, catalog)
    # Aliases and substitutions resolved once, here; a name several providers serve stays
    # as it is, for the router to choose among them.
    if not catalog.is_shared_name(name):
        body["model"] = model.id
    return Admission(model=model, body=body, routing=routing, metadata=metadata,
                     timeout_ms=policy.timeout_ms)


def _fallbacks(chain: object, name: str, model: Model, catalog: Catalog) -> list[str]:
    """The body's `models` (OpenRouter's fallback list; the OpenAI SDK sends it through
    `extra_body`) as the catalog's names, the requested model itself left out."""
    if not isinstance(chain, list) or not all(isinstance(n, str) for n in chain):
        raise Unprocessable("models must be a list of model names", code="invalid_field",
                            param="models")
    if len(chain) > MAX_FALLBACKS + 1:
        raise Unprocessable(f"models: at most {MAX_FALLBACKS} fallbacks",
                            code="invalid_field", param="models")
    out: list[str] = []
    for i, fallback in enumerate(chain):
        if fallback == name or fallback in out:
            continue  # OpenRouter's lists start with the model itself
        check_fallback(catalog, model, fallback, f"models.{i}")
        out.append(fallback)
    return out


def _routing(policy: Policy, mode: str | None) -> dict[str, Any]:
    # No mode: the tenant's default_mode applies (the router reads the tenant's policy).
    routing: dict[str, Any] = {} if mode is None else {"mode": mode}
    if policy.optimize_for is not None:
        routing["weights"] = _WEIGHTS[policy.optimize_for]
    if policy.provider is not None:
        routing["allowed_providers"] = [policy.provider]
    if policy.fallback_enabled is not None:
        routing["fallback_enabled"] = policy.fallback_enabled
    return routing


def _extension(raw: object, mode_header: str | None, catalog: Catalog) -> dict[str, Any]:
    """The routing options the request sets itself (nothing set: the tenant's defaults)."""
    if raw is None and mode_header is None:
        return {}  # the common case, on every request: no model to build
    extension = Extension() if raw is None else parse_model(Extension, raw, prefix="switchyard")
    mode = extension.mode
    if mode_header is not None:
        if mode is not None and mode != mode_header:
            raise InvalidRequest(f"{MODE_HEADER} says {mode_header!r} but switchyard.mode "
                                 f"says {mode!r}", code="conflicting_mode", param=MODE_HEADER)
        mode = mode_header
    if mode is not None and mode not in MODES:
        param = MODE_HEADER if mode_header is not None else "switchyard.mode"
        raise InvalidRequest(f"unknown mode {mode!r}; modes: {', '.join(MODES)}",
                             code="unknown_mode", param=param)
    if extension.judge_model is not None:
        judge = catalog.model(extension.judge_model)
        if judge is None or judge.kind != "chat":
            raise NotFound(f"judge model {extension.judge_model!r} is not a chat model; "
                           "GET /v1/models lists them", code="model_not_found",
                           param="switchyard.judge_model")
        extension = extension.model_copy(update={"judge_model": judge.id})
    out = extension.model_dump(exclude_none=True)
    if mode is not None:
        out["mode"] = mode
    return out


def _policy(raw: object) -> Policy:
    return Policy() if raw is None else parse_model(Policy, raw, prefix="policy")


def _pin(model: Model, provider: str, catalog: Catalog) -> Model:
    """The model itself if `provider` serves it, else that provider's model of the same
    equivalence class."""
    if provider not in catalog.providers:
        raise InvalidRequest(f"policy.provider {provider!r} is not a provider; known: "
                             f"{', '.join(sorted(catalog.providers))}",
                             code="unknown_provider", param="policy.provider")
    if model.provider == provider:
        return model
    for candidate in catalog.models:
        if candidate.provider == provider and candidate.class_ == model.class_ \
                and candidate.kind == model.kind:
            return candidate
    raise InvalidRequest(f"{provider} has no {model.class_} model to serve {model.id!r} "
                         "under policy.provider", code="policy_conflict",
                         param="policy.provider")
