-- Identity (topics/identity.py, state/keys.py): a tenant can be suspended; a key has a name,
-- a role, an optional expiry, an optional list of the models it may use, and the time it
-- was last used (written in batches, not per request).

ALTER TABLE tenants
    ADD COLUMN status           text NOT NULL DEFAULT 'active'
                                CHECK (status IN ('active', 'suspended')),
    ADD COLUMN tier             text NOT NULL DEFAULT 'growth',
    ADD COLUMN suspended_at     timestamptz,
    ADD COLUMN suspended_reason text;

-- Keys created before roles existed were their tenant's only keys: they keep every right.
ALTER TABLE api_keys
    ADD COLUMN name           text NOT NULL DEFAULT '',
    ADD COLUMN role           text NOT NULL DEFAULT 'tenant_admin'
                              CHECK (role IN ('platform_admin', 'tenant_admin', 'member',
                                              'viewer', 'billing')),
    ADD COLUMN expires_at     timestamptz,
    ADD COLUMN allowed_models text[],
    ADD COLUMN last_used_at   timestamptz;

CREATE INDEX api_keys_tenant ON api_keys (tenant_id, created_at);
