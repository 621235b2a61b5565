"""Typed configuration, read from the environment once per process.

Every variable is `SWITCHYARD_<SECTION>__<FIELD>` (e.g. `SWITCHYARD_KAFKA__BOOTSTRAP_SERVERS`);
top-level fields are `SWITCHYARD_<FIELD>`. The README's configuration reference lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class KafkaSettings(BaseModel):
    bootstrap_servers: str = "127.0.0.1:19092"
    request_partitions: int = Field(default=6, ge=1)
    usage_partitions: int = Field(default=3, ge=1)
    reply_partitions: int = Field(default=3, ge=1)
    # 0: a message goes out at once; under load, messages still share a produce request
    # (those queued while the previous one is in flight). 1 ms cost 1.2 ms per hop at p50.
    linger_ms: int = Field(default=0, ge=0)
    # A killed consumer's partitions move after this long; short on a single box.
    session_timeout_ms: int = Field(default=6000, ge=1000)
    heartbeat_interval_ms: int = Field(default=1000, ge=100)


class RedisSettings(BaseModel):
    url: str = "redis://127.0.0.1:16379/0"
    # A router runs up to `router.max_in_flight` requests, each a few short Redis calls:
    # too small a pool makes overload fail requests ("No connection available").
    max_connections: int = Field(default=256, ge=4)
    pool_timeout_s: float = Field(default=5.0, gt=0)


class PostgresSettings(BaseModel):
    dsn: str = "postgresql://switchyard@127.0.0.1:15432/switchyard"
    pool_min: int = Field(default=1, ge=1)
    pool_max: int = Field(default=8, ge=1)


class IngressSettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = Field(default=1, ge=1)
    max_body_bytes: int = Field(default=33_554_432, ge=1024)  # room for a few images
    max_image_bytes: int = Field(default=20_971_520, ge=1024)  # one decoded data-URL image
    auth_cache_ttl_s: float = Field(default=30.0, ge=0)
    auth_negative_cache_ttl_s: float = Field(default=2.0, ge=0)
    # How long a request may wait in the pipeline before it is answered with a timeout.
    default_deadline_s: float = Field(default=120.0, gt=0)
    max_deadline_s: float = Field(default=600.0, gt=0)
    health_timeout_s: float = Field(default=2.0, gt=0)


class RouterSettings(BaseModel):
    # Label prompts in this process, reading llm.requests, instead of reading llm.classified
    # behind a classifier process: one Kafka hop (~1.5 ms) and one process's wake-ups fewer
    # per request. False: the classifier runs as its own stage (`switchyard classifier`),
    # e.g. to scale it apart from the routers.
    classify_inline: bool = True
    max_in_flight: int = Field(default=512, ge=1)
    # How long a claim on a request id survives; longer than any request may run.
    claim_ttl_s: int = Field(default=3600, ge=60)
    # A worker's liveness key expires this long after its last refresh.
    heartbeat_ttl_ms: int = Field(default=3000, ge=500)
    shutdown_grace_s: float = Field(default=20.0, ge=0)
    upstream_connect_timeout_s: float = Field(default=5.0, gt=0)
    upstream_ttft_timeout_s: float = Field(default=60.0, gt=0)
    upstream_idle_timeout_s: float = Field(default=30.0, gt=0)
    upstream_total_timeout_s: float = Field(default=300.0, gt=0)
    upstream_pool_size: int = Field(default=512, ge=1)
    metrics_port: int = 0  # 0: no metrics endpoint
    # Stream chunks after a request's first leave at most this often (all requests' chunks
    # in one publish): one Redis write and one SSE write per chunk was the bound on token
    # relay. First chunks, meta, done and errors never wait. 0: no coalescing.
    reply_flush_interval_ms: float = Field(default=5.0, ge=0, le=50)
    # How fast old outcomes fade toward the prior. bench/simulate.py: at 10 requests/s, 8 s
    # leaves a degraded provider within ~160 requests; longer half-lives lower regret but
    # leave later. Scale it with traffic: it should span ~100 requests of a category.
    bandit_half_life_s: float = Field(default=8.0, gt=0)
    posterior_cache_ttl_s: float = Field(default=0.1, ge=0, le=1)
    # The share of answers expected to get a quality score (POST /v1/feedback): it sets how
    # much one score counts against one outcome. 0: quality never enters the reward.
    feedback_rate: float = Field(default=0.1, ge=0, le=1)
    # How long a router keeps a tenant's routing policy before reading it again.
    policy_cache_ttl_s: float = Field(default=5.0, ge=0)
    # Failover: routes one request may try (the first included) on retryable failures
    # before its first token; each route is called up to 1 + route_retries times.
    max_attempts: int = Field(default=3, ge=1, le=10)
    route_retries: int = Field(default=2, ge=0, le=10, description=(
        "Calls to the same route after its first, before the request fails over to the "
        "next, on a transient provider fault before the first token (HTTP 429, 500, 502, "
        "503, 504; a connection refused or closed before the response headers). Each waits "
        "a jittered exponential backoff, or the provider's Retry-After; none is made if that "
        "wait would not fit the request's deadline."))
    retry_backoff_base_ms: float = Field(default=200.0, gt=0, description=(
        "Backoff before the first retry on a route; it doubles with each retry, up to "
        "retry_backoff_cap_ms, and is jittered to between half and all of that."))
    retry_backoff_cap_ms: float = Field(default=2000.0, gt=0, description=(
        "The longest backoff between two calls to a route."))
    retry_after_max_ms: float = Field(default=5000.0, ge=0, description=(
        "The longest Retry-After a route's retry waits; a provider asking for more (or more "
        "than the request's deadline leaves) is failed over at once, and if no route "
        "answers, the client gets the provider's status with its Retry-After."))
    # Routes started by default: raced at once (speculative), at most (hedged), asked
    # (council). A request's `switchyard.routes` overrides them.
    race_routes: int = Field(default=2, ge=2, le=8)
    hedge_routes: int = Field(default=2, ge=2, le=8)
    council_members: int = Field(default=3, ge=2, le=8)
    # Hedging starts the next route when the first has not answered within this percentile
    # of its observed time to first answer; before 20 observations, after the fixed delay.
    hedge_percentile: float = Field(default=90.0, gt=0, lt=100)
    hedge_default_delay_ms: float = Field(default=1000.0, gt=0)
    # Council: the judge when neither the request nor the tenant's policy names one (unset:
    # a council request must name one), answers needed, and time limits.
    council_judge_model: str | None = None
    council_quorum: int = Field(default=2, ge=1)
    council_member_timeout_s: float = Field(default=60.0, gt=0)
    council_judge_timeout_s: float = Field(default=60.0, gt=0)
    council_progress_every_s: float = Field(default=2.0, gt=0)
    # Circuit breakers, per route, shared by every router through Redis: open on
    # `breaker_consecutive_failures` in a row, or a failure rate of `breaker_failure_rate`
    # over `breaker_min_calls` or more calls in `breaker_window_s`; probe after the cool-down.
    breaker_window_s: float = Field(default=10.0, gt=0)
    breaker_min_calls: int = Field(default=10, ge=1)
    breaker_failure_rate: float = Field(default=0.5, gt=0, le=1)
    breaker_consecutive_failures: int = Field(default=5, ge=1)
    breaker_cooldown_s: float = Field(default=5.0, ge=0)
    breaker_probes: int = Field(default=1, ge=1)
    breaker_probe_timeout_s: float = Field(default=30.0, gt=0)
    breaker_cache_ttl_s: float = Field(default=0.05, ge=0, le=1)


class UsageSettings(BaseModel):
    max_in_flight: int = Field(default=2048, ge=1)
    batch_max: int = Field(default=500, ge=1)
    batch_linger_ms: float = Field(default=5.0, ge=0)
    # Billing is off the answer's path: the broker holds a fetch until this many bytes are
    # there or the wait is over, so one fetch and one ledger statement carry many events.
    fetch_min_bytes: int = Field(default=65_536, ge=1)
    fetch_max_wait_ms: int = Field(default=200, ge=0, le=5000)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    metrics_port: int = 0


class ClassifierSettings(BaseModel):
    model_path: Path = (Path(__file__).resolve().parents[1]
                        / "workers/classifier/model/prompt-classifier-v1.onnx")
    max_in_flight: int = Field(default=1024, ge=1)
    # One ONNX call runs on the event loop: 16 prompts hold it ~3 ms (64 would hold it ~12 ms).
    max_batch: int = Field(default=16, ge=1)
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    # How often the classifier process checks that some router reads what it forwards (it
    # warns if none does: its share of the requests would wait in llm.classified).
    reader_check_interval_s: float = Field(default=30.0, gt=0)


class VaultSettings(BaseModel):
    # "k1:<base64url or hex of 32 bytes>,k2:<…>". Several ids so a new master key can be rolled
    # in beside the old one; empty: the vault routes answer 503 instead of failing the start.
    master_keys: SecretStr = SecretStr("")
    active_key_id: str = ""  # the id every new encryption uses
    # How long a router keeps a tenant's decrypted key before reading it again.
    cache_ttl_s: float = Field(default=30.0, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SWITCHYARD_", env_nested_delimiter="__", extra="ignore"
    )

    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    postgres: PostgresSettings = PostgresSettings()
    ingress: IngressSettings = IngressSettings()
    router: RouterSettings = RouterSettings()
    usage: UsageSettings = UsageSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    vault: VaultSettings = VaultSettings()
    catalog_path: Path = Path(__file__).with_name("catalog.toml")
    # When set, routes whose provider key is not configured go to this OpenAI-compatible
    # server instead (the fake upstream of the local stack), so the stack works offline.
    fallback_upstream_url: str | None = None
    # Per-provider endpoint overrides (a regional endpoint, a proxy), as JSON:
    # {"openai": "https://proxy.internal/v1"}. They replace the catalog's base_url.
    provider_base_urls: dict[str, str] = Field(default_factory=dict)
    dev_api_key: str | None = None
    log_level: str = "INFO"

    @classmethod
    def env_names(cls) -> list[str]:
        """Every environment variable these settings read."""
        names = []
        for name, field in cls.model_fields.items():
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                names += [f"SWITCHYARD_{name.upper()}__{n.upper()}" for n in sub.model_fields]
            else:
                names.append(f"SWITCHYARD_{name.upper()}")
        return names

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        env: dict[str, str] = {}
        dumped = self.model_dump(mode="json")
        for name, field in type(self).model_fields.items():
            value = dumped[name]
            sub = field.annotation
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                section = getattr(self, name)
                for key, subval in value.items():
                    if subval is None:
                        continue  # unset in the child too (an empty string is a value)
                    raw = getattr(section, key)
                    # model_dump masks a SecretStr as "**********"; a child needs the value.
                    env[f"SWITCHYARD_{name.upper()}__{key.upper()}"] = (
                        raw.get_secret_value() if isinstance(raw, SecretStr)
                        else _env_value(subval))
            elif value is not None:
                env[f"SWITCHYARD_{name.upper()}"] = _env_value(value)
        return env


def default(section: type[BaseModel], field: str) -> Any:
    """A setting's declared default, for the plain config objects built from a section
    (e.g. `state.breakers.BreakerConfig`): defaults are declared once, here."""
    return section.model_fields[field].default


def _env_value(value: object) -> str:
    # Structured values travel as JSON, which pydantic-settings parses back.
    return orjson.dumps(value).decode() if isinstance(value, dict | list) else str(value)
