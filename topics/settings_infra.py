"""The settings of the infrastructure every process talks to: Kafka, Redis, PostgreSQL.
Part of the one configuration (`topics/settings.py`, which reads the environment and
re-exports these sections)."""

from __future__ import annotations

from pydantic import BaseModel, Field

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
