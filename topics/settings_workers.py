"""The settings of the workers: routers, the usage and audit writers, the prompt classifier.
Part of the one configuration (`topics/settings.py`, which reads the environment and
re-exports these sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, field_validator


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
