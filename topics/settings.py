"""Typed configuration, read from the environment once per process.

Every variable is `SWITCHYARD_<SECTION>__<FIELD>` (e.g. `SWITCHYARD_KAFKA__BOOTSTRAP_SERVERS`);
top-level fields are `SWITCHYARD_<FIELD>`. Each field's `description` is the documentation:
docs/configuration.md lists them all, generated from these models (`make docs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from topics.settings_infra import ENVELOPE_ALLOWANCE, KafkaSettings, PostgresSettings, RedisSettings
from topics.settings_workers import (
    AuditSettings,
    ClassifierSettings,
    RouterSettings,
    UsageSettings,
)

# The sections live in two modules of their own; everything is imported from here.
__all__ = [
    "ENVELOPE_ALLOWANCE", "AuditSettings", "AuthSettings", "CacheSettings", "ClassifierSettings",
    "IngressSettings", "KafkaSettings", "LimitsSettings", "MetricsSettings", "PostgresSettings",
    "RedisSettings", "RouterSettings", "Settings", "UsageSettings", "VaultSettings", "default",
]


class IngressSettings(BaseModel):
    """The HTTP edge: listening, body limits, the key cache, deadlines, health checks."""

    host: str = Field(default="127.0.0.1", description="Listen address.")
    port: int = Field(default=8080, description="Listen port.")
    workers: int = Field(
        default=1, ge=1,
        description="Ingress processes (each has its own Redis reply channel).")
    max_body_bytes: int = Field(
        default=33_554_432, ge=1024,
        description="Largest request body, room for a few images; a larger one gets 413 "
        "`request_too_large` (checked while reading, with or without `Content-Length`).")
    max_image_bytes: int = Field(
        default=20_971_520, ge=1024,
        description="Largest decoded data-URL image in a chat request; a larger one gets 413 "
        "`image_too_large`.")
    auth_cache_ttl_s: float = Field(
        default=10.0, ge=0,
        description="How long each ingress process caches a valid API key's lookup (by the key "
        "for API keys, by the tenant and key id for session tokens). A revocation (a key "
        "revoked or rotated, a tenant suspended) reaches every ingress at once through the "
        "revocations channel; an ingress that misses it (its Redis subscription down) stops "
        "honouring the key within this long.")
    auth_negative_cache_ttl_s: float = Field(
        default=2.0, ge=0,
        description="How long each ingress process caches an unknown API key as unknown.")
    provider_private_urls: bool = Field(
        default=True,
        description="Whether a tenant may register a provider (`POST /v1/providers/register`) "
        "whose base URL resolves to a loopback, private, link-local or otherwise non-public "
        "address (a vLLM or Ollama next to the gateway). Set it false where tenants must "
        "not reach the gateway's own network: such URLs are then refused with 400 "
        "`invalid_provider` at registration, update and test.")
    last_used_flush_s: float = Field(
        default=5.0, gt=0,
        description="How often each ingress writes the `last_used_at` of the API keys it "
        "served (one statement per tenant served, never a write per request): the time "
        "lags by at most this much.")
    default_deadline_s: float = Field(
        default=120.0, gt=0,
        description="Deadline of a request without `x-switchyard-timeout-ms`: how long it may "
        "wait in the pipeline and run before it is answered with a timeout.")
    max_deadline_s: float = Field(
        default=600.0, gt=0,
        description="The longest deadline a client may ask for (beyond it: 400 "
        "`invalid_header`).")
    health_timeout_s: float = Field(
        default=2.0, gt=0, description="Per-dependency timeout of `GET /v1/health`.")
    budget_cache_ttl_s: float = Field(
        default=5.0, ge=0,
        description="How long each ingress process caches a tenant's spend budgets "
        "(docs/budgets.md); a change through the API applies at once on the ingress that "
        "took it, within this long on the others.")
    responses_ttl_s: int = Field(
        default=2_592_000, ge=1,
        description="How long a stored response of `POST /v1/responses` (`store` not false) "
        "stays retrievable (`GET /v1/responses/{id}`) and continuable (`previous_response_id`), "
        "in Redis; 30 days, as OpenAI keeps them.")


class VaultSettings(BaseModel):
    """Tenants' own provider keys, encrypted under master keys."""

    master_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Vault master keys, `k1:<base64url or hex of 32 bytes>,k2:<…>` (secret). "
        "Several ids so a new master key can be rolled in beside the old one. Empty: the "
        "vault routes answer 503 `vault_not_configured` instead of failing the start.")
    active_key_id: str = Field(
        default="", description="The master key id every new encryption uses.")
    cache_ttl_s: float = Field(
        default=30.0, ge=0,
        description="How long a router keeps a tenant's decrypted provider key before reading "
        "it again.")


class AuthSettings(BaseModel):
    """Session tokens (JWT, HS256) that `POST /v1/auth/login` issues for an API key."""

    signing_keys: SecretStr = Field(
        default=SecretStr(""),
        description="Session signing keys, `s1:<base64url of at least 32 bytes>,s2:<…>` "
        "(secret). Every key listed verifies tokens (the JWT header's `kid` names the key "
        "that signed it); only `active_signing_key` signs. Several ids let a new key be rolled "
        "in without downtime (docs/tenancy.md). `switchyard auth new-signing-key` prints one; "
        "`switchyard up` generates one for its run when unset. Empty: `POST /v1/auth/login` "
        "answers 503 `sessions_not_configured` and session tokens are refused.")
    active_signing_key: str = Field(
        default="", description="The id of the signing key new session tokens are signed with.")
    session_ttl_s: int = Field(
        default=86_400, ge=1, le=30 * 86_400,
        description="How long a session token is valid after login or refresh (never past the "
        "API key's own expiry).")
    issuer: str = Field(
        default="switchyard", min_length=1,
        description="The tokens' `iss`: set at signing, required at verification.")
    audience: str = Field(
        default="switchyard-api", min_length=1,
        description="The tokens' `aud`: set at signing, required at verification.")
    clock_leeway_s: float = Field(
        default=5.0, ge=0, le=300,
        description="Clock difference tolerated between the process that signed a token and "
        "the one verifying it (`iat` in the future, `exp` just past).")


class LimitsSettings(BaseModel):
    """Rate limits (docs/limits.md): requests per second and minute, tokens per minute,
    concurrent requests, per tenant and per key, enforced in Redis."""

    enabled: bool = Field(
        default=True,
        description="Enforce rate limits at admission (ingress) and on the batch path "
        "(router). Off: no limit is checked and no `x-ratelimit-*` header is sent.")
    cache_ttl_s: float = Field(
        default=10.0, ge=0,
        description="How long each process caches a tenant's limits; a change through the "
        "admin API reaches every process at once through the revocation broadcast.")
    fail_open: bool = Field(
        default=True,
        description="Default for tenants that set none: while Redis is unreachable at "
        "admission, serve the request unlimited (true; logged and counted in "
        "`switchyard_limit_admissions_total{outcome=\"fail_open\"}`) or refuse it with 503 "
        "`limits_unavailable` and `Retry-After` (false). Never waits longer than "
        "`redis.socket_timeout_s`.")


class MetricsSettings(BaseModel):
    """Prometheus metrics of every process (docs/operations.md)."""

    tenant_labels: bool = Field(
        default=False,
        description="Add a `tenant` label to the routers' token and cost counters "
        "(`switchyard_router_tokens_total`, `switchyard_router_cost_usd_total`): one series "
        "per tenant, provider and model. Off by default: the series grow with the tenants.")


class CacheSettings(BaseModel):
    """The response cache (docs/cache.md): exact-match answers in Redis, opt-in per tenant
    (its routing policy's `cache`) and per request (`x-switchyard-cache`)."""

    enabled: bool = Field(
        default=True,
        description="Serve and store cached answers for the tenants and requests that opt in. "
        "Off: `x-switchyard-cache` is ignored and no request is looked up.")
    default_ttl_s: int = Field(
        default=3600, ge=1,
        description="An entry's lifetime when neither the request "
        "(`x-switchyard-cache-ttl`) nor the tenant's policy (`cache.ttl_s`) names one.")
    max_ttl_s: int = Field(
        default=86400, ge=1,
        description="The longest lifetime an entry gets; a longer `x-switchyard-cache-ttl` "
        "gets 400 `invalid_header`, a longer policy `ttl_s` is capped.")
    max_entry_bytes: int = Field(
        default=1_048_576, ge=1024,
        description="Largest answer stored (its JSON); a larger one is served but not cached "
        "(`switchyard_cache_store_skips_total{reason=\"too_large\"}`).")
    policy_cache_ttl_s: float = Field(
        default=10.0, ge=0,
        description="How long each ingress caches a tenant's cache policy (read from its "
        "routing policy); a change applies at once on the ingress that took it, within this "
        "long on the others.")


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
    audit: AuditSettings = AuditSettings()
    classifier: ClassifierSettings = ClassifierSettings()
    vault: VaultSettings = VaultSettings()
    auth: AuthSettings = AuthSettings()
    limits: LimitsSettings = LimitsSettings()
    metrics: MetricsSettings = MetricsSettings()
    cache: CacheSettings = CacheSettings()
    catalog_path: Path = Field(
        default=Path(__file__).with_name("catalog.toml"),
        description="The model catalog (providers, models, prices).")
    fallback_upstream_url: str | None = Field(
        default=None,
        description="When set, routes whose provider key is not configured go to this "
        "OpenAI-compatible server instead (`make up` sets it to the fake upstream), so the "
        "stack works offline.")
    provider_base_urls: dict[str, str] = Field(
        default_factory=dict,
        description="Per-provider endpoint overrides (a regional endpoint, a proxy), as a JSON "
        "object: `{\"openai\": \"https://proxy.internal/v1\"}`. They replace the catalog's "
        "`base_url`.")
    dev_api_key: str | None = Field(
        default=None,
        description="The API key `make up` seeds for the `dev` tenant (unset: it generates "
        "one and prints it).")
    log_level: str = Field(default="INFO", description="Log level of every process.")
    log_format: Literal["json", "text"] = Field(
        default="json",
        description="Log lines of every process: `json` (one object a line with `ts`, `level`, "
        "`logger`, `message`, `process`, `trace_id`, `span_id`, `request_id`) or `text` "
        "(`switchyard up` sets it, for people reading a terminal).")
    trace_content: bool = Field(
        default=False,
        description="Record prompts and completions in the provider attempts' spans "
        "(`gen_ai.input.messages`, `gen_ai.output.messages`). Off, spans hold no text of a "
        "request. Tracing itself is set with the standard `OTEL_*` variables "
        "(docs/operations.md, Traces).")
    shutdown_close_timeout_s: float = Field(
        default=3.0, gt=0,
        description="On SIGTERM, after its drain (`…__SHUTDOWN_GRACE_S`), the most a process "
        "spends closing its connections (Kafka producer and consumers, Redis, PostgreSQL pool), "
        "all together: a close still waiting then (its service unreachable) is aborted. A "
        "process still alive at grace + this + 1 s exits at once (code 1); a second SIGTERM "
        "or SIGINT exits at once too.")

    @model_validator(mode="after")
    def _bodies_fit_kafka(self) -> Settings:
        # Any body the ingress accepts must fit a Kafka message; else a legal request would
        # be refused as if the queue were down.
        needed = self.ingress.max_body_bytes + ENVELOPE_ALLOWANCE
        if self.kafka.max_message_bytes < needed:
            raise ValueError(
                f"SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES ({self.kafka.max_message_bytes}) must be "
                f"at least SWITCHYARD_INGRESS__MAX_BODY_BYTES ({self.ingress.max_body_bytes}) "
                f"+ {ENVELOPE_ALLOWANCE} for the envelope: set it to {needed} or more, or "
                f"lower the body limit")
        return self

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
