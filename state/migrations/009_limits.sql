-- Rate-limit overrides (state/limits.py, topics/limits.py): a tenant's own limits replacing
-- its tier's (key_id = ''), and a key's own limits (key_id = the key's id). A column that is
-- NULL keeps the default (the tier's for a tenant, none for a key); 0 means unlimited.
-- `fail_open` (tenant rows only): admission's behaviour while Redis is unreachable.

CREATE TABLE rate_limits (
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    key_id text NOT NULL DEFAULT '',
    requests_per_second integer CHECK (requests_per_second >= 0),
    burst integer CHECK (burst >= 0),
    requests_per_minute integer CHECK (requests_per_minute >= 0),
    tokens_per_minute bigint CHECK (tokens_per_minute >= 0),
    concurrent_requests integer CHECK (concurrent_requests >= 0),
    fail_open boolean,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key_id)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON rate_limits TO switchyard_app;

ALTER TABLE rate_limits ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON rate_limits
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON rate_limits TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');
