-- Providers a tenant registers itself (topics/tenant_providers.py, state/tenant_providers.py):
-- a base URL of one dialect and the models it serves, with the prices the tenant declares.
-- The provider's key is in provider_keys (the vault) under this row's id, never here.

CREATE TABLE tenant_providers (
    id               text PRIMARY KEY,        -- 'tp_' + random hex: the routes' provider name
    tenant_id        text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    name             text NOT NULL,
    type             text NOT NULL,
    dialect          text NOT NULL CHECK (dialect IN ('openai', 'anthropic', 'gemini')),
    base_url         text NOT NULL,
    -- [{name, input_per_mtok, output_per_mtok, ...}] as DeclaredModel.public() writes them
    models           jsonb NOT NULL DEFAULT '[]' CHECK (jsonb_typeof(models) = 'array'),
    priority         int NOT NULL DEFAULT 0,
    weight           double precision NOT NULL DEFAULT 1 CHECK (weight >= 0),
    enabled          boolean NOT NULL DEFAULT true,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    -- The last probe (test or health): never the key, an error message without it.
    last_check_at    timestamptz,
    last_success     boolean,
    last_latency_ms  double precision,
    last_error       text,
    UNIQUE (tenant_id, name)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON tenant_providers TO switchyard_app;

ALTER TABLE tenant_providers ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenant_providers
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON tenant_providers TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');
