"""The model catalog: a TOML data file, validated once at start, shared by ingress and router."""

from __future__ import annotations

import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

_MTOK = Decimal(1_000_000)


Dialect = Literal["openai", "anthropic", "gemini"]
ModelClass = Literal["frontier", "fast", "reasoning", "code", "embedding"]
Capability = Literal["chat", "stream", "tools", "json", "vision", "reasoning", "embeddings"]


class TimeoutOverrides(BaseModel):
    """Per provider or per model; what is not set falls back to the router's settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    connect_s: float | None = Field(default=None, gt=0)
    ttft_s: float | None = Field(default=None, gt=0)
    idle_s: float | None = Field(default=None, gt=0)
    total_s: float | None = Field(default=None, gt=0)


class Provider(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    dialect: Dialect
    base_url: str
    api_key_env: str
    prices_checked: str
    timeouts: TimeoutOverrides = TimeoutOverrides()


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    provider: str
    upstream_model: str
    kind: Literal["chat", "embedding"] = "chat"
    class_: ModelClass = Field(alias="class")
    aliases: list[str] = Field(default_factory=list)
    # The one model this route serves when other providers serve it too: routes with the same
    # `serves` are one model's routes (named by this, the router load-balances among them).
    serves: str | None = None
    capabilities: list[Capability]
    timeouts: TimeoutOverrides = TimeoutOverrides()
    context_window: int = Field(gt=0)
    input_per_mtok: Decimal = Field(ge=0)
    cached_input_per_mtok: Decimal = Field(ge=0)
    output_per_mtok: Decimal = Field(ge=0)

    def cost_usd(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> Decimal:
        """Exact cost of one attempt; cached prompt tokens are billed at their own price."""
        uncached = max(prompt_tokens - cached_tokens, 0)
        return (
            uncached * self.input_per_mtok
            + min(cached_tokens, prompt_tokens) * self.cached_input_per_mtok
            + completion_tokens * self.output_per_mtok
        ) / _MTOK


class Catalog(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    providers: dict[str, Provider]
    models: list[Model]
    _by_id: dict[str, Model] = PrivateAttr(default_factory=dict)
    _routes: dict[str, tuple[Model, ...]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        for model in self.models:
            if model.provider not in self.providers:
                raise ValueError(f"model {model.id!r} names unknown provider {model.provider!r}")
            for name in (model.id, *model.aliases):
                if name in self._by_id:
                    raise ValueError(f"model name {name!r} is listed twice")
                self._by_id[name] = model
        for model in self.models:
            if model.serves is not None:
                self._routes[model.serves] = (*self._routes.get(model.serves, ()), model)
        for name, routes in self._routes.items():
            if name in self._by_id:
                raise ValueError(f"serves {name!r} is also a model id or alias")
            if len({m.kind for m in routes}) > 1:
                raise ValueError(f"the routes serving {name!r} are not all of one kind")
        return self

    def model(self, name: str) -> Model | None:
        """The model called `name` (its id or an alias, or the name several routes serve:
        then the first of them)."""
        found = self._by_id.get(name)
        if found is None and name in self._routes:
            return self._routes[name][0]
        return found

    def routes_of(self, name: str) -> tuple[Model, ...]:
        """Every route of the model called `name`, the named route first: a route id or alias
        gives that route, then the other providers' routes of the same model; a `serves`
        name gives all of them in catalog order. Empty for an unknown name."""
        found = self._by_id.get(name)
        if found is None:
            return self._routes.get(name, ())
        others = self._routes.get(found.serves, ()) if found.serves is not None else ()
        return (found, *(m for m in others if m is not found))

    def is_shared_name(self, name: str) -> bool:
        """Whether `name` is one that several providers' routes serve (no route preferred)."""
        return name not in self._by_id and name in self._routes


def load_catalog(path: Path) -> Catalog:
    with path.open("rb") as f:
        return Catalog.model_validate(tomllib.load(f))
