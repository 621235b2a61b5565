"""Typed configuration, read from the environment once per process.

Every variable is `SWITCHYARD_<SECTION>__<FIELD>` (e.g. `SWITCHYARD_KAFKA__BOOTSTRAP_SERVERS`);
top-level fields are `SWITCHYARD_<FIELD>`. Each field's `description` is the documentation:
docs/configuration.md lists them all, generated from these models (`make docs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# What a request envelope adds to the body it carries (ids, deadline, routing, metadata, the
# reply address): `kafka.max_message_bytes` must leave at least this above
# `ingress.max_body_bytes`.
ENVELOPE_ALLOWANCE = 1_048_576


class KafkaSettings(BaseModel):
    """Brokers, topic partitions, producer batching and consumer-group timing."""

    bootstrap_servers: str = Field(
        default="127.0.0.1:19092", description="Kafka brokers, `host:port[,host:port…]`.")
    request_partitions: int = Field(
        default=6, ge=1,
        description="Partitions of `llm.requests` and `llm.classified`: the most router (or "
        "classifier) processes that can share the load.")
    usage_partitions: int = Field(
        default=3, ge=1, description="Partitions of `llm.usage` and `audit.events`.")
    reply_partitions: int = Field(
        default=3, ge=1,
        description="Partitions of `llm.replies`, the default reply topic of batch producers.")
    linger_ms: int = Field(
        default=0, ge=0,
        description="Producer batching delay. 0: a message goes out at once; under load, "
        "messages still share a produce request (those queued while the previous one is in "
        "flight). 1 ms cost 1.2 ms per hop at p50.")
    session_timeout_ms: int = Field(
        default=6000, ge=1000,
        description="How soon a killed consumer's partitions move to another consumer; short "
        "on a single box.")
    heartbeat_interval_ms: int = Field(
        default=1000, ge=100, description="Consumer-group heartbeat interval.")
    max_message_bytes: int = Field(
        default=35_651_584, ge=1_048_576,
        description="Largest message the gateway puts on Kafka: a request envelope (the body "
        "plus ids, routing and metadata), or a reply frame on a batch reply topic. At least "
        "`ingress.max_body_bytes` + 1 MiB, checked at start (the default, 34 MiB, suits the "
        "default 32 MiB body). Every Kafka-side limit is this + 64 KiB: each topic's "
        "`max.message.bytes` (set at creation, raised on existing topics by `switchyard "
        "init`; a process refuses to start against a topic below it), the producer's "
        "`max_request_size`, the consumers' fetch sizes, the local broker's "
        "`message.max.bytes`. A request whose envelope is larger gets 413 "
        "`request_too_large`; an answer larger than this, 502 `response_too_large`.")


class RedisSettings(BaseModel):
    """Claims, liveness, cancels, bandit posteriors, circuit breakers and reply channels."""

    url: str = Field(default="redis://127.0.0.1:16379/0", description="Redis URL.")
    max_connections: int = Field(
        default=256, ge=4,
        description="Connection pool size per process; callers wait for a free connection up "
        "to `pool_timeout_s`. A router runs up to `router.max_in_flight` requests, each a few "
        "short Redis calls: too small a pool makes overload fail requests (\"No connection "
        "available\").")
    pool_timeout_s: float = Field(
        default=5.0, gt=0, description="Longest wait for a pooled Redis connection.")
    socket_timeout_s: float = Field(
        default=2.0, gt=0,
        description="Longest wait for one Redis command's reply (and for a new connection): a "
        "Redis that is paused or cut off costs a call this much at most, then it counts as an "
        "outage (claims wait it out until the request's deadline, routing serves from what it "
        "last read, see docs/architecture.md). Far above any healthy command's time.")
    reply_check_s: float = Field(
        default=1.0, gt=0,
        description="How long the ingress's reply subscription may stay silent before it "
        "PINGs Redis on it; no answer within `socket_timeout_s` counts as losing the channel "
        "(waiting requests fail with 503 `reply_channel_lost`). A paused Redis is noticed "
        "within about `reply_check_s + socket_timeout_s`; an idle channel costs one PING per "
        "`reply_check_s`.")
    revocation_check_s: float = Field(
        default=1.0, gt=0,
        description="How long the revocations subscription of an ingress or router may stay "
        "silent before it PINGs Redis on it; no answer within `socket_timeout_s` counts as "
        "losing it: the process subscribes again and then forgets every cached key, since "
        "revocations published meanwhile are lost.")


class PostgresSettings(BaseModel):
    """API keys, the vault, routing policies, the usage ledger, the audit trail."""

    dsn: str = Field(
        default="postgresql://switchyard_app@127.0.0.1:15432/switchyard",
        description="What the gateway's processes connect with: a role that is "
        "`switchyard_app` or a member of it, owns no table and cannot bypass row-level "
        "security (a process refuses to start otherwise). Each transaction acts for one "
        "tenant (docs/operations.md, \"Database roles and tenant isolation\").")
    owner_dsn: str = Field(
        default="postgresql://switchyard@127.0.0.1:15432/switchyard",
        description="What migrations and the admin commands connect with (`switchyard "
        "init`, `keys create`, `vault reencrypt`): the role that owns the tables. Same "
        "database as `dsn`; give it to those commands only, never to the processes.")
    pool_min: int = Field(default=1, ge=1, description="asyncpg pool minimum, per process.")
    pool_max: int = Field(default=8, ge=1, description="asyncpg pool maximum, per process.")
    connect_timeout_s: float = Field(
        default=5.0, gt=0,
        description="Longest wait for a new connection: a database that is down or paused "
        "costs a request this much at most, then 503 `database_unavailable`.")
    command_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest wait for one statement's result.")


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


class RouterSettings(BaseModel):
    """Router workers: classification, claims, provider calls, the bandit, modes, breakers."""

    budget_cache_ttl_s: float = Field(
        default=5.0, ge=0,
        description="How long each router caches a tenant's spend budgets (docs/budgets.md).")

    classify_inline: bool = Field(
        default=True,
        description="Label prompts in this process, reading `llm.requests`, instead of "
        "reading `llm.classified` behind a classifier process: one Kafka hop (~1.5 ms) and "
        "one process's wake-ups fewer per request. `false`: the classifier runs as its own "
        "stage (`switchyard classifier`), e.g. to scale it apart from the routers.")
    max_in_flight: int = Field(
        default=512, ge=1, description="Requests one router process runs at once.")
    claim_ttl_s: int = Field(
        default=3600, ge=60,
        description="How long a claim on a request id survives; longer than any request may "
        "run.")
    heartbeat_ttl_ms: int = Field(
        default=3000, ge=500,
        description="A router's liveness key (refreshed every second) expires this long after "
        "its last refresh: the router is then presumed dead, and a redelivered request it had "
        "claimed is answered `worker_lost` instead of being run twice.")
    shutdown_grace_s: float = Field(
        default=20.0, ge=0, description="Drain time on SIGTERM.")
    upstream_connect_timeout_s: float = Field(
        default=5.0, gt=0, description="Provider connect timeout.")
    upstream_ttft_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Longest wait from sending a request to the provider's first byte of "
        "answer.")
    upstream_idle_timeout_s: float = Field(
        default=30.0, gt=0,
        description="Longest silence between two events of a provider's stream.")
    upstream_total_timeout_s: float = Field(
        default=300.0, gt=0,
        description="Ceiling of one provider call (the request's deadline usually cuts "
        "first).")
    upstream_pool_size: int = Field(
        default=512, ge=1, description="Pooled upstream connections per router process.")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of a router process's metrics and probe server (`/metrics`, "
        "`/healthz`, `/readyz`; 0: none). `make up`, compose and the Helm chart use 9101.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the router's metrics and probe server binds (`0.0.0.0` in a "
        "container, so that Prometheus and the kubelet reach it).")
    reply_flush_interval_ms: float = Field(
        default=5.0, ge=0, le=50,
        description="Stream chunks after a request's first leave at most this often (all "
        "requests' pending chunks in one publish): one Redis write and one SSE write per chunk "
        "was the bound on token relay. First chunks, meta, done and errors never wait. 0: no "
        "coalescing.")
    bandit_half_life_s: float = Field(
        default=8.0, gt=0,
        description="How fast old outcomes fade toward the prior in the shared posteriors. "
        "bench/simulate.py: at 10 requests/s, 8 s leaves a degraded provider within ~160 "
        "requests; longer half-lives lower regret but leave later. Scale it with traffic: it "
        "should span ~100 requests of a category (8 s suits 10 requests/s, see "
        "bench/RESULTS.md).")
    posterior_cache_ttl_s: float = Field(
        default=0.1, ge=0, le=1,
        description="How long a router reuses bandit posteriors read from Redis.")
    feedback_rate: float = Field(
        default=0.1, ge=0, le=1,
        description="The share of answers expected to get a quality score (`POST "
        "/v1/feedback`): it sets how much one score counts against one outcome (one score "
        "stands for the answers it represents). 0: quality never enters the reward.")
    key_cache_ttl_s: float = Field(
        default=10.0, ge=0,
        description="How long a router keeps what it read of a request's API key and tenant "
        "(revoked, expired, suspended, role, allowed models) before reading it again; a "
        "revocation broadcast drops it at once.")
    policy_cache_ttl_s: float = Field(
        default=5.0, ge=0,
        description="How long a router keeps a tenant's routing policy before reading it "
        "again.")
    max_attempts: int = Field(
        default=3, ge=1, le=10,
        description="Failover budget: routes one request may try (the first included) on "
        "retryable failures before its first token; each route is called up to "
        "1 + `route_retries` times.")
    route_retries: int = Field(default=2, ge=0, le=10, description=(
        "Calls to the same route after its first, before the request fails over to the "
        "next, on a transient provider fault before the first token (HTTP 429, 500, 502, "
        "503, 504; a connection refused or closed before the response headers). Each waits "
        "a jittered exponential backoff, or the provider's Retry-After; none is made if that "
        "wait would not fit the request's deadline."))
    retry_backoff_base_ms: float = Field(default=200.0, gt=0, description=(
        "Backoff before the first retry on a route; it doubles with each retry, up to "
        "`retry_backoff_cap_ms`, and is jittered to between half and all of that."))
    retry_backoff_cap_ms: float = Field(default=2000.0, gt=0, description=(
        "The longest backoff between two calls to a route."))
    retry_after_max_ms: float = Field(default=5000.0, ge=0, description=(
        "The longest Retry-After a route's retry waits; a provider asking for more (or more "
        "than the request's deadline leaves) is failed over at once, and if no route "
        "answers, the client gets the provider's status with its Retry-After."))
    race_routes: int = Field(
        default=2, ge=2, le=8,
        description="Speculative mode: routes raced at once, unless the request's "
        "`switchyard.routes` says otherwise.")
    hedge_routes: int = Field(
        default=2, ge=2, le=8,
        description="Hedged mode: routes started at most (the first plus hedges), unless the "
        "request's `switchyard.routes` says otherwise.")
    council_members: int = Field(
        default=3, ge=2, le=8,
        description="Council mode: members asked, unless the request's `switchyard.routes` "
        "says otherwise.")
    hedge_percentile: float = Field(
        default=90.0, gt=0, lt=100,
        description="Hedged mode: the next route starts when the first has not answered "
        "within this percentile of its observed time to first answer.")
    hedge_default_delay_ms: float = Field(
        default=1000.0, gt=0,
        description="Hedged mode: the delay before the next route of a route with fewer than "
        "20 observations in this router.")
    council_judge_model: str | None = Field(
        default=None,
        description="Council mode: the judge when neither the request "
        "(`switchyard.judge_model`) nor the tenant's policy (`judge_model`) names one. Unset: "
        "a council request without a judge gets 400 `judge_required`.")
    council_quorum: int = Field(
        default=2, ge=1,
        description="Council mode: answers needed before the judge is asked (with fewer "
        "members: all of them).")
    council_member_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Council mode: a member that has not answered by then is dropped.")
    council_judge_timeout_s: float = Field(
        default=60.0, gt=0,
        description="Council mode: time limit of the judge's call (and of a synthesis).")
    council_progress_every_s: float = Field(
        default=2.0, gt=0,
        description="Council mode: a streamed council sends a progress comment at least this "
        "often while members work.")
    breaker_window_s: float = Field(
        default=10.0, gt=0,
        description="Circuit breakers (per route, shared by every router through Redis): the "
        "window the failure rate is measured over.")
    breaker_min_calls: int = Field(
        default=10, ge=1,
        description="Circuit breakers: the failure rate opens a breaker only over at least "
        "this many calls in the window.")
    breaker_failure_rate: float = Field(
        default=0.5, gt=0, le=1,
        description="Circuit breakers: failures / calls in the window that open a breaker.")
    breaker_consecutive_failures: int = Field(
        default=5, ge=1,
        description="Circuit breakers: failures in a row that open a breaker, whatever the "
        "rate.")
    breaker_cooldown_s: float = Field(
        default=5.0, ge=0,
        description="Circuit breakers: an open breaker admits a probe after this long.")
    breaker_probes: int = Field(
        default=1, ge=1,
        description="Circuit breakers: concurrent probe calls a half-open breaker admits.")
    breaker_probe_timeout_s: float = Field(
        default=30.0, gt=0,
        description="Circuit breakers: a probe slot whose outcome never arrives is freed "
        "after this long.")
    breaker_cache_ttl_s: float = Field(
        default=0.05, ge=0, le=1,
        description="Circuit breakers: how stale a router's view of another router's breaker "
        "changes may be.")


class UsageSettings(BaseModel):
    """The usage worker, which writes usage events into the ledger."""

    max_in_flight: int = Field(
        default=2048, ge=1, description="Usage events one usage worker holds in flight.")
    batch_max: int = Field(default=500, ge=1, description="Most events per ledger statement.")
    batch_linger_ms: float = Field(
        default=5.0, ge=0, description="Longest wait to fill a batch.")
    fetch_min_bytes: int = Field(
        default=65_536, ge=1,
        description="Billing is off the answer's path: the broker holds a usage fetch until "
        "this many bytes are there (or `fetch_max_wait_ms` is over), so one fetch and one "
        "ledger statement carry many events.")
    fetch_max_wait_ms: int = Field(
        default=200, ge=0, le=5000,
        description="The longest the broker holds a usage fetch: billing trails answers by "
        "at most this, in exchange for fewer fetches and ledger statements.")
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Drain time on SIGTERM.")
    write_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Longest one ledger write may take, getting a connection included; one "
        "cut off is retried like a refused one (the events wait, nothing is lost). Bounds a "
        "connection attempt left hanging across a database restart.")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the usage worker's metrics and probe server (`/metrics`, "
        "`/healthz`, `/readyz`; 0: none). `make up`, compose and the Helm chart use 9102.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the usage worker's metrics and probe server binds (`0.0.0.0` in a "
        "container, so that Prometheus and the kubelet reach it).")


class AuditSettings(BaseModel):
    """The audit trail: the ingress's publishing of audit events and the audit writer, which
    appends them to each tenant's hash chain in PostgreSQL (docs/audit.md)."""

    publish_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Longest the ingress waits for Kafka to acknowledge an audit event before "
        "it answers the action that caused it; past it (or when Kafka refuses), the action "
        "is answered 503 `audit_unavailable` and the event is written to the ingress's log.")
    max_in_flight: int = Field(
        default=256, ge=1, description="Audit events one audit writer holds in flight.")
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Drain time on SIGTERM.")
    write_timeout_s: float = Field(
        default=10.0, gt=0,
        description="Longest one chain append may take, getting a connection included; one "
        "cut off is retried like a refused one (the event waits, nothing is lost).")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the audit writer's metrics and probe server (`/metrics`, "
        "`/healthz`, `/readyz`; 0: none). `make up`, compose and the Helm chart use 9103.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the audit writer's metrics and probe server binds (`0.0.0.0` in a "
        "container, so that Prometheus and the kubelet reach it).")


class ClassifierSettings(BaseModel):
    """The prompt classifier, inline in routers or as its own stage."""

    model_path: Path = Field(
        default=(Path(__file__).resolve().parents[1]
                 / "workers/classifier/model/prompt-classifier-v1.onnx"),
        description="The ONNX prompt classifier (default: the model versioned in the "
        "repository).")
    encoder_path: Path | None = Field(
        default=(Path(__file__).resolve().parents[1]
                 / "workers/classifier/model/prompt-encoder-v1.onnx"),
        description="The fine-tuned prompt encoder the cascade asks when the linear model is "
        "unsure (its tokenizer is the `.tokenizer.json` file beside it). Empty: the linear "
        "model alone, which is faster and about 3 points less accurate (docs/routing.md).")
    encoder_threshold: float | None = Field(
        default=None, ge=0, le=1,
        description="Below this top probability of the linear model, the encoder is asked "
        "too. Unset: the threshold chosen on dev and stored in the encoder file. Higher "
        "sends more prompts to the encoder (more accurate, more CPU).")

    @field_validator("encoder_path", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value
    max_in_flight: int = Field(
        default=1024, ge=1,
        description="Requests the classifier stage holds at once (when it runs as its own "
        "process).")
    max_batch: int = Field(
        default=16, ge=1,
        description="Most prompts classified in one ONNX call, in a router or the classifier "
        "stage. One call runs on the event loop, ~0.2 ms per prompt: 16 prompts hold it ~3 ms "
        "(64 would hold it ~12 ms).")
    shutdown_grace_s: float = Field(
        default=10.0, ge=0, description="Drain time on SIGTERM.")
    reader_check_interval_s: float = Field(
        default=30.0, gt=0,
        description="How often a classifier process checks that some router reads what it "
        "forwards (it warns while none does: its share of the requests would wait in "
        "`llm.classified`).")
    metrics_port: int = Field(
        default=0, ge=0, le=65535,
        description="Port of the classifier stage's metrics and probe server (`/metrics`, "
        "`/healthz`, `/readyz`; 0: none). `make up`, compose and the Helm chart use 9104.")
    metrics_host: str = Field(
        default="127.0.0.1",
        description="Address the classifier stage's metrics and probe server binds (`0.0.0.0` in a "
        "container, so that Prometheus and the kubelet reach it).")


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
