-- The audit trail (state/audit.py, docs/audit.md): one append-only hash chain per tenant.
-- Each row's hash is SHA-256 over its canonical encoding (topics/audit.py row_hash), which
-- includes the previous row's hash: changing, removing or reordering a row breaks the chain
-- from there on, and `switchyard audit verify` names the first row that does not fit.

-- The role the gateway's processes use (row-level security applies to it; see
-- state/tenancy.py). Created here too, so this migration stands on its own.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'switchyard_app') THEN
        CREATE ROLE switchyard_app NOLOGIN;
    END IF;
END
$$;

-- No foreign key to tenants: the trail of a deleted tenant is kept.
CREATE TABLE audit_events (
    event_id     uuid PRIMARY KEY,          -- the event's idempotency key
    tenant_id    text NOT NULL,
    seq          bigint NOT NULL CHECK (seq >= 1),  -- 1, 2, 3... per tenant, no gaps
    occurred_at  timestamptz NOT NULL,
    recorded_at  timestamptz NOT NULL,
    actor        text NOT NULL,             -- an API key id, a user id, or 'platform'
    actor_role   text,
    action       text NOT NULL,
    target       text,
    -- json, not jsonb: json keeps the exact text, which is what the hash covers (jsonb would
    -- rewrite numbers and key order).
    details      json NOT NULL,
    request_id   text,
    trace_id     text,
    source_ip    text,
    prev_hash    text NOT NULL CHECK (prev_hash ~ '^[0-9a-f]{64}$'),
    hash         text NOT NULL CHECK (hash ~ '^[0-9a-f]{64}$'),
    UNIQUE (tenant_id, seq)                 -- two rows can never claim one place: no fork
);
CREATE INDEX audit_events_action ON audit_events (tenant_id, action, seq);
CREATE INDEX audit_events_actor ON audit_events (tenant_id, actor, seq);
CREATE INDEX audit_events_time ON audit_events (tenant_id, occurred_at);

-- Each tenant's last row: the writer appends after it under a per-tenant lock, and verify
-- compares it with the last row, so removing the newest rows is noticed too.
CREATE TABLE audit_chain_heads (
    tenant_id   text PRIMARY KEY,
    seq         bigint NOT NULL,
    hash        text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Append-only, for every role, the owner included (privileges below are the first line; this
-- is the second, for roles privileges do not stop).
CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_events_no_change BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Row-level security, as in 005_isolation.sql: a transaction sees and writes only the rows of
-- the tenant it acts for (`app.tenant_id`, state/tenancy.py tenant_scope); the owner sees
-- every chain in a platform_scope (`switchyard audit verify`).
ALTER TABLE audit_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_events FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_events
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON audit_events TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');
ALTER TABLE audit_chain_heads ENABLE ROW LEVEL SECURITY;
ALTER TABLE audit_chain_heads FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON audit_chain_heads
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON audit_chain_heads TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

-- The gateway may add rows and read them, never change or remove one; only the chain head
-- moves.
REVOKE ALL ON audit_events, audit_chain_heads FROM PUBLIC;
GRANT SELECT, INSERT ON audit_events TO switchyard_app;
GRANT SELECT, INSERT, UPDATE ON audit_chain_heads TO switchyard_app;
