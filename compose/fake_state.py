"""The fake upstream's knobs, counters and app state, shared by every dialect it speaks."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "o3-mini")
CONFIG_HEADER = "x-fake-config"
CALL_LOG_MAX = 10_000
REQUEST_ID_HEADER = "X-Client-Request-Id"


class FakeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttft_ms: float = Field(0, ge=0)
    # A heavy tail, as real providers have: each call's wait is ttft_ms * exp(N(0, sigma))
    # (median ttft_ms), times slow_factor for a slow_rate share of calls. Drawn from the
    # seeded rng, so a run replays.
    ttft_sigma: float = Field(0, ge=0)
    slow_rate: float = Field(0, ge=0, le=1)
    slow_factor: float = Field(10, ge=1)
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
    # The first this-many calls of each model, counted from when the config was last set
    # (or the fake reset), fail with error_status, then the model is healthy: a transient
    # fault ("500 once": fail_first=1).
    fail_first: int = Field(0, ge=0)
    # Refusals a real model makes of a request it cannot take, each a 400 in the dialect's
    # own words: a prompt (as counted for usage) over `context_window` tokens; every request
    # (`content_filter`, the provider's content policy); a conversation that ends with an
    # assistant message (`rejects_prefill`, as models without prefill support do).
    context_window: int | None = Field(None, ge=1)
    content_filter: bool = False
    rejects_prefill: bool = False
    # How every injected failure (error_rate, fail_models, fail_first) shows: an HTTP error
    # with error_status ("status"); the connection closed before any response, as a crashed
    # server or a reset does ("reset"); or no answer at all, the request held open until the
    # client leaves ("hang").
    fail_mode: Literal["status", "reset", "hang"] = "status"
    # The Retry-After header (seconds or an HTTP date) of injected error statuses, outage
    # included. None: none sent.
    retry_after: str | None = None
    # Streams: after this many tokens, `malformed_events` events whose data is not JSON,
    # then the rest of the answer as usual.
    malformed_after_tokens: int | None = Field(None, ge=0)
    malformed_events: int = Field(1, ge=1)
    # Streams end cleanly after their finish reason and usage but without their terminator
    # (OpenAI's `data: [DONE]`, Anthropic's message_stop), as some compatible servers do.
    omit_done: bool = False
    # A fixed text answer, streamed word by word, instead of the generated "word-i" tokens.
    answer: str | None = None
    # Answer a council's judge prompt (candidate blocks, see fake_judge) with a JSON verdict
    # that scores the candidates containing this key highest.
    judge_key: str | None = None
    # Knobs for one upstream model, on top of the rest: one fake can host a healthy model, a
    # slow one and a broken one.
    per_model: dict[str, dict[str, Any]] = Field(default_factory=dict)
    seed: int = 0
    models: list[str] = Field(default_factory=lambda: list(DEFAULT_MODELS))

    @field_validator("per_model")
    @classmethod
    def _check_per_model(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        checked: dict[str, dict[str, Any]] = {}
        for model, patch in value.items():
            if "per_model" in patch:
                raise ValueError(f"per_model[{model!r}] must not contain per_model")
            # Checked now, so a bad knob is refused when it is set, not on the model's call.
            checked[model] = cls.model_validate(patch).model_dump(include=set(patch))
        return checked

    def merged(self, patch: dict[str, Any]) -> FakeConfig:
        """Return a validated copy with ``patch`` applied (raises ``ValidationError``)."""
        return FakeConfig.model_validate({**self.model_dump(), **patch})


@dataclass
class FakeStats:
    requests_total: int = 0
    calls_by_request_id: dict[str, int] = field(default_factory=dict)
    calls_by_model: dict[str, int] = field(default_factory=dict)
    open_streams: int = 0
    completed_streams: int = 0
    disconnects: int = 0
    cut_streams: int = 0
    errors_sent: int = 0
    last_authorization: str | None = None
    # The Anthropic dialect's last request: its `anthropic-version` and `anthropic-beta`
    # headers and its body, as they arrived (what a native pass-through must keep).
    last_anthropic: dict[str, Any] | None = None
    # The OpenAI dialect's last request body, as it arrived (what a translation must send).
    last_chat: dict[str, Any] | None = None
    # Every call, in order: {"model", "at" (Unix time, seconds), "request_id", "fault" (what
    # was injected: "status 429", "reset", "hang"; None), "body_bytes" (the request body's
    # Content-Length)}. The most recent CALL_LOG_MAX kept.
    call_log: list[dict[str, Any]] = field(default_factory=list)

    def log_call(self, model: str | None, request_id: str | None,
                 body_bytes: int | None = None) -> dict[str, Any]:
        entry: dict[str, Any] = {"model": model, "at": time.time(), "request_id": request_id,
                                 "fault": None, "body_bytes": body_bytes}
        self.call_log.append(entry)
        if len(self.call_log) > CALL_LOG_MAX:
            del self.call_log[:len(self.call_log) - CALL_LOG_MAX]
        return entry

    def reset(self) -> None:
        # open_streams is live state, not a counter: zeroing it would drive it negative.
        self.__dict__.update(FakeStats(open_streams=self.open_streams).__dict__)


@dataclass
class FakeState:
    initial: FakeConfig
    config: FakeConfig
    rng: random.Random
    stats: FakeStats = field(default_factory=FakeStats)
    # fail_first's count: calls of each model failed since the config was last set.
    failed_first: dict[str, int] = field(default_factory=dict)

    def configure(self, config: FakeConfig) -> None:
        self.config = config
        self.failed_first.clear()

    def reset(self) -> None:
        # A shared fake must not leak one test's knobs into the next, so knobs go back too.
        self.stats.reset()
        self.configure(self.initial)
        self.rng.seed(self.config.seed)


STATE_KEY = web.AppKey("fake_upstream_state", FakeState)
