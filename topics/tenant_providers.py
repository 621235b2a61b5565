"""Providers a tenant registers itself (the seed product's /v1/providers): the request shapes,
the stored record, and how a tenant's providers become routes of that tenant's catalog.

A registered provider is a base URL speaking one dialect (`openai`, `anthropic`, `gemini`),
a key (kept in the tenant's vault, never here), the models it serves with the prices the
tenant declares, a priority, a weight and an enabled flag. `tenant_catalog(catalog,
providers)` is the catalog the router and the ingress use for that tenant: the shared
catalog plus one route per model of each enabled provider, so that policies, the bandit,
breakers and billing treat them like any other route. Another tenant's catalog does not
have them, so naming one there is the usual 404 `model_not_found`.

Route names: the route id is `<provider id>/<model>` (globally unique: the bandit's
posteriors and the breakers, shared in Redis, are keyed by it); `<provider name>/<model>` is
an alias, and the bare `<model>` too when the shared catalog does not already use that name.
When several of the tenant's providers serve one bare name, it names all of them (the
catalog's `serves`): the bandit balances among them, listed by priority.

The other files of the feature: `state/tenant_providers.py` stores them (PostgreSQL, row-level
security) and caches each tenant's catalog; `ingress/tenant_providers.py` serves the routes;
`workers/router/routes.py` calls a registered base URL with the key from the vault.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)

from topics.catalog import Capability, Catalog, Dialect, Model, ModelClass, Provider

DIALECTS: tuple[Dialect, ...] = ("openai", "anthropic", "gemini")
# `type` values that mean "an OpenAI-compatible server" (a base URL is then required).
OPENAI_COMPATIBLE = frozenset({"openai-compatible", "openai_compatible", "custom"})
ID_PREFIX = "tp_"  # every registered provider's id; never a catalog provider's name
MAX_MODELS = 64
DEFAULT_CONTEXT_WINDOW = 128_000
DEFAULT_CAPABILITIES: tuple[Capability, ...] = ("chat", "stream", "tools", "json")
PRICES_NOTE = "declared by the tenant"

_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_MODEL = re.compile(r"\S{1,128}")


def _name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError("must be 1 to 64 letters, digits, '_', '.' or '-'")
    return value


def _model_name(value: str) -> str:
    if not _MODEL.fullmatch(value):
        raise ValueError("must be 1 to 128 characters without spaces")
    return value


def _base_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise ValueError("must not carry credentials (send the key as api_key)")
    if parts.query or parts.fragment:
        raise ValueError("must not have a query or fragment")
    return value.rstrip("/")


def _no_bool(value: object) -> object:
    if isinstance(value, bool):
        raise ValueError("must be a number or a decimal string")
    return value


Name = Annotated[StrictStr, AfterValidator(_name)]
ModelName = Annotated[StrictStr, AfterValidator(_model_name)]
BaseUrl = Annotated[StrictStr, Field(max_length=2048), AfterValidator(_base_url)]
# US dollars per million tokens, as a number or a decimal string; returned as a string.
Price = Annotated[Decimal, BeforeValidator(_no_bool),
                  Field(ge=0, allow_inf_nan=False, max_digits=18, decimal_places=6)]
Weight = Annotated[float, BeforeValidator(_no_bool), Field(ge=0, le=1_000_000,
                                                           allow_inf_nan=False)]
Priority = Annotated[StrictInt, Field(ge=-1_000_000, le=1_000_000)]


class DeclaredModel(BaseModel):
    """One model a registered provider serves. The seed SDKs send only the name (a string in
    `models`); the rest is ours and optional: prices default to 0 (the tenant pays its
    provider directly; the gateway bills what it is told)."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: ModelName
    input_per_mtok: Price = Decimal(0)
    output_per_mtok: Price = Decimal(0)
    cached_input_per_mtok: Price | None = None  # None: the input price
    context_window: Annotated[StrictInt, Field(gt=0, le=100_000_000)] = DEFAULT_CONTEXT_WINDOW
    capabilities: tuple[Capability, ...] = DEFAULT_CAPABILITIES
    class_: ModelClass = Field(default="frontier", alias="class")

    def public(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


def _declared(value: object) -> object:
    return {"name": value} if isinstance(value, str) else value


def _unique_models(models: tuple[DeclaredModel, ...]) -> tuple[DeclaredModel, ...]:
    names = Counter(m.name for m in models)
    if twice := [n for n, c in names.items() if c > 1]:
        raise ValueError(f"{twice[0]!r} is listed twice")
    return models


ModelItem = Annotated[DeclaredModel, BeforeValidator(_declared)]
Models = Annotated[tuple[ModelItem, ...], Field(max_length=MAX_MODELS),
                   AfterValidator(_unique_models)]
ApiKey = Annotated[StrictStr, Field(min_length=1, max_length=4096)]


class RegisterProvider(BaseModel):
    """`POST /v1/providers/register` and `POST /v1/providers/test`."""

    model_config = ConfigDict(extra="forbid")

    name: Name
    type: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    api_key: ApiKey | None = None
    base_url: BaseUrl | None = None
    models: Models = ()
    priority: Priority = 0
    weight: Weight = 1.0
    enabled: StrictBool = True


class UpdateProvider(BaseModel):
    """`PUT /v1/providers/{id}`: a partial object; what is left out is kept. `api_key: null`
    forgets the stored key."""

    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    type: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    api_key: ApiKey | None = None
    base_url: BaseUrl | None = None
    models: Models | None = None
    priority: Priority | None = None
    weight: Weight | None = None
    enabled: StrictBool | None = None


def resolve_type(type_: str, base_url: str | None, catalog: Catalog) -> tuple[Dialect, str]:
    """(dialect, base URL) of a provider of `type_`: a dialect's name, a provider of the
    catalog (its dialect, and its base URL unless one is given) or an OpenAI-compatible
    server. Raises ValueError saying what is missing."""
    named = catalog.providers.get(type_)
    if named is not None:
        return named.dialect, base_url or named.base_url.rstrip("/")
    if type_ in DIALECTS or type_ in OPENAI_COMPATIBLE:
        dialect: Dialect = "openai" if type_ in OPENAI_COMPATIBLE else type_  # type: ignore[assignment]
        if base_url is None:
            raise ValueError(f"a provider of type {type_!r} needs a base_url")
        return dialect, base_url
    raise ValueError(f"unknown type {type_!r}: a dialect ({', '.join(DIALECTS)}), "
                     f"'openai-compatible', or a provider of the catalog "
                     f"({', '.join(sorted(catalog.providers))})")


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe of a provider (`POST /v1/providers/test`, `GET .../health`)."""

    success: bool
    latency_ms: float
    error: str | None = None


@dataclass(frozen=True, slots=True)
class TenantProvider:
    """A stored registration. The key is not here: it is in the vault, under the provider's
    id (`has_key` says whether one is stored)."""

    id: str
    tenant_id: str
    name: str
    type: str
    dialect: Dialect
    base_url: str
    models: tuple[DeclaredModel, ...]
    priority: int
    weight: float
    enabled: bool
    has_key: bool
    created_at: datetime
    updated_at: datetime
    last_check_at: datetime | None = None
    last_probe: ProbeResult | None = None

    @property
    def status(self) -> str:
        return "active" if self.enabled else "disabled"

    def route_ids(self) -> list[str]:
        return [route_id(self.id, m.name) for m in self.models]


def route_id(provider_id: str, model: str) -> str:
    return f"{provider_id}/{model}"


def is_tenant_provider(provider: str) -> bool:
    return provider.startswith(ID_PREFIX)


def tenant_catalog(catalog: Catalog, providers: Iterable[TenantProvider]) -> Catalog:
    """`catalog` plus the routes of the enabled `providers` (one tenant's); `catalog` itself
    when there are none, so tenants without registered providers share one object."""
    enabled = sorted((p for p in providers if p.enabled and p.models),
                     key=lambda p: (-p.priority, -p.weight, p.created_at, p.id))
    if not enabled:
        return catalog
    bare = Counter(m.name for p in enabled for m in p.models)
    models: list[Model] = []
    for p in enabled:
        for m in p.models:
            aliases = [a for a in (f"{p.name}/{m.name}",) if catalog.model(a) is None]
            serves = None
            if catalog.model(m.name) is None:  # the shared catalog's names stay its own
                if bare[m.name] == 1:
                    aliases.append(m.name)
                else:
                    serves = m.name
            models.append(Model.model_validate({
                "id": route_id(p.id, m.name), "provider": p.id, "upstream_model": m.name,
                "class": m.class_, "aliases": aliases, "serves": serves,
                "capabilities": list(m.capabilities), "context_window": m.context_window,
                "input_per_mtok": m.input_per_mtok, "output_per_mtok": m.output_per_mtok,
                "cached_input_per_mtok": (m.input_per_mtok if m.cached_input_per_mtok is None
                                          else m.cached_input_per_mtok)}))
    return Catalog(
        providers={**catalog.providers,
                   **{p.id: Provider(dialect=p.dialect, base_url=p.base_url, api_key_env="",
                                     prices_checked=PRICES_NOTE) for p in enabled}},
        models=[*catalog.models, *models])


@dataclass(frozen=True, slots=True)
class TenantRoutes:
    """What routing reads for one tenant: its catalog (`tenant_catalog`) and its
    registrations (the disabled ones too, so a preview can say why a route is missing)."""

    catalog: Catalog
    providers: tuple[TenantProvider, ...] = ()
