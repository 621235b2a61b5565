"""The fake upstream's knobs, counters and app state, shared by every dialect it speaks."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o3-mini")
CONFIG_HEADER = "x-fake-config"
REQUEST_ID_HEADER = "X-Client-Request-Id"


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(0, ge=0)
    inter_token_ms: float = Field(0, ge=0)
    tokens: int = Field(16, ge=0)
    error_rate: float = Field(0, ge=0, le=1)
    error_status: int = Field(500, ge=400, le=599)
    outage: bool = False
    cut_after_tokens: int | None = Field(None, ge=0)
    prompt_tokens_override: int | None = Field(None, ge=0)
    cached_tokens: int = Field(0, ge=0)
    # Like some OpenAI-compatible servers: streams never carry usage, even when asked.
    omit_stream_usage: bool = False
    # Requests for these (upstream) models fail with error_status: one route degrades, the
    # others stay healthy.
    fail_models: list[str] = Field(default_factory=list)
    seed: int = 0
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    def merged(self, patch: dict[str, Any]) -> FakeConfig:
        """Return a validated copy with ``patch`` applied (raises ``ValidationError``)."""
        return FakeConfig.model_validate({**self.model_dump(), **patch})


@dataclass
class FakeStats:
    requests_total: int = 0
    calls_by_request_id: dict[str, int] = field(default_factory=dict)
    open_streams: int = 0
    completed_streams: int = 0
    disconnects: int = 0
    cut_streams: int = 0
    errors_sent: int = 0
    last_authorization: str | None = None

    def reset(self) -> None:
        # open_streams is live state, not a counter: zeroing it would drive it negative.
        self.__dict__.update(FakeStats(open_streams=self.open_streams).__dict__)


@dataclass
class FakeState:
    initial: FakeConfig
    config: FakeConfig
    rng: random.Random
    stats: FakeStats = field(default_factory=FakeStats)

    def reset(self) -> None:
        # A shared fake must not leak one test's knobs into the next, so knobs go back too.
        self.stats.reset()
        self.config = self.initial
        self.rng.seed(self.config.seed)


STATE_KEY = web.AppKey("fake_upstream_state", FakeState)
