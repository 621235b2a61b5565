-- Tenants, API keys (SHA-256 only, never the key), the usage ledger and its daily rollup.

CREATE TABLE tenants (
    id          text PRIMARY KEY,
    name        text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE api_keys (
    id          text PRIMARY KEY,
    tenant_id   text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_sha256  bytea NOT NULL UNIQUE,
    prefix      text NOT NULL,          -- first characters, so a person can tell keys apart
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

-- One row per attempt that reached a provider; event_id makes replays harmless.
CREATE TABLE usage_events (
    event_id          uuid PRIMARY KEY,
    request_id        text NOT NULL,
    tenant_id         text NOT NULL,
    key_id            text NOT NULL,
    provider          text NOT NULL,
    model             text NOT NULL,
    category          text,
    mode              text NOT NULL,
    status            text NOT NULL,
    error_code        text,
    prompt_tokens     integer NOT NULL,
    completion_tokens integer NOT NULL,
    cached_tokens     integer NOT NULL,
    estimated         boolean NOT NULL,
    cost_usd          numeric(20, 10) NOT NULL,
    latency_ms        double precision NOT NULL,
    ttft_ms           double precision,
    attempt           integer NOT NULL,
    started_at        timestamptz NOT NULL,
    finished_at       timestamptz NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX usage_events_request ON usage_events (request_id);
CREATE INDEX usage_events_tenant_time ON usage_events (tenant_id, started_at);

-- Maintained in the same statement as the insert into usage_events, from the rows that
-- were really inserted, so it always agrees with the ledger.
CREATE TABLE usage_daily (
    tenant_id          text NOT NULL,
    day                date NOT NULL,
    model              text NOT NULL,
    requests           bigint NOT NULL,   -- first attempts: one per request
    attempts           bigint NOT NULL,   -- every attempt that reached a provider
    prompt_tokens      bigint NOT NULL,
    completion_tokens  bigint NOT NULL,
    cached_tokens      bigint NOT NULL,
    cost_usd           numeric(24, 10) NOT NULL,
    PRIMARY KEY (tenant_id, day, model)
);
