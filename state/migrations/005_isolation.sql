-- Tenant isolation in the database (docs/operations.md, "Database roles and tenant isolation").
--
-- Two roles. The owner is whoever runs these migrations (`postgres.owner_dsn`): it owns every
-- table and function. `switchyard_app` is what the gateway's processes act as
-- (`postgres.dsn` logs in as it, or as a member of it): it owns nothing, bypasses nothing and
-- holds only the grants below. It is created here without LOGIN when missing (no password
-- ever lives in a migration); `switchyard init` gives the login.
--
-- Every tenant-owned table has row-level security, forced on its owner too. A transaction
-- names its tenant with set_config('app.tenant_id', <id>, true) (state/tenancy.py
-- tenant_scope) and sees, and may write, that tenant's rows only. Unset, the setting reads
-- NULL (or '' in a session where it was set before): no row matches, so a query that forgets
-- its tenant returns nothing.
--
-- The owner's cross-tenant work (the admin commands, the key lookup below) is explicit: the
-- `platform` policies let the owner role, and no other, see every row in a transaction that
-- set app.platform to 'on' (state/tenancy.py platform_scope). The owner's query that forgets
-- to say so sees nothing either. A superuser owner (the local stack's) bypasses all of this.

DO $$
BEGIN
    IF current_user = 'switchyard_app' OR pg_has_role('switchyard_app', current_user, 'MEMBER')
    THEN
        RAISE EXCEPTION 'migrations must run as the owner role (postgres.owner_dsn), not as '
                        'switchyard_app or a role it can become';
    END IF;
EXCEPTION WHEN undefined_object THEN
    NULL;  -- no switchyard_app yet: created below
END $$;

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'switchyard_app') THEN
        CREATE ROLE switchyard_app NOLOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB NOCREATEROLE;
    ELSIF EXISTS (SELECT FROM pg_roles WHERE rolname = 'switchyard_app'
                  AND (rolsuper OR rolbypassrls)) THEN
        RAISE EXCEPTION 'role switchyard_app is a superuser or has BYPASSRLS: row-level '
                        'security would not apply to it';
    END IF;
END $$;

-- What the processes do, table by table; nothing more (no DDL, no TRUNCATE, no REFERENCES).
GRANT SELECT ON tenants TO switchyard_app;
GRANT SELECT, INSERT, UPDATE ON api_keys TO switchyard_app;  -- a tenant's own keys
GRANT SELECT, INSERT ON usage_events TO switchyard_app;      -- the ledger: append-only
GRANT SELECT, INSERT, UPDATE ON usage_daily TO switchyard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON provider_keys TO switchyard_app;
GRANT SELECT, INSERT, UPDATE, DELETE ON routing_policies TO switchyard_app;

ALTER TABLE tenants ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON tenants TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

ALTER TABLE api_keys ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON api_keys
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON api_keys TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

ALTER TABLE usage_events ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON usage_events
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON usage_events TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

ALTER TABLE usage_daily ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON usage_daily
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON usage_daily TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

ALTER TABLE provider_keys ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON provider_keys
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON provider_keys TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

ALTER TABLE routing_policies ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON routing_policies
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON routing_policies TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');

-- Authentication: the one read the processes make before they know the tenant. Given a key's
-- SHA-256 (which only the key's holder can produce), the key's row and its tenant's, whole,
-- so columns added to either table later come along. It runs as the owner, in platform scope
-- for its one query (set here: PostgreSQL lets only a superuser put a custom setting in a
-- function's SET clause), with a search path no caller can put objects into ahead of ours.
CREATE FUNCTION switchyard_find_key(sha256 bytea)
RETURNS TABLE (api_key api_keys, tenant tenants)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    before text := current_setting('app.platform', true);
BEGIN
    PERFORM set_config('app.platform', 'on', true);
    RETURN QUERY
        SELECT k, t FROM public.api_keys AS k JOIN public.tenants AS t ON t.id = k.tenant_id
        WHERE k.key_sha256 = sha256 AND k.revoked_at IS NULL;
    PERFORM set_config('app.platform', coalesce(before, ''), true);
END
$$;
REVOKE ALL ON FUNCTION switchyard_find_key(bytea) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION switchyard_find_key(bytea) TO switchyard_app;
