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

    @model_validator(mode="after")
    def _consistent(self) -> Catalog:
        for model in self.models:
            if model.provider not in self.providers:
                raise ValueError(f"model {model.id!r} names unknown provider {model.provider!r}")
            for name in (model.id, *model.aliases):
                if name in self._by_id:
                    raise ValueError(f"model name {name!r} is listed twice")
                self._by_id[name] = model
        return self

    def model(self, name: str) -> Model | None:
        """The model called `name` (its id or an alias)."""
        return self._by_id.get(name)


def load_catalog(path: Path) -> Catalog:
    with path.open("rb") as f:
        return Catalog.model_validate(tomllib.load(f))
