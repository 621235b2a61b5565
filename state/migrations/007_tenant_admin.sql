-- Tenants managed through the admin API (state/tenants.py): a tier among the seed's, and a
-- monthly budget of the tenant's own (NULL: its tier's), enforced by the limits of issue 18.

ALTER TABLE tenants
    ADD COLUMN monthly_budget_usd numeric(20, 6) CHECK (monthly_budget_usd > 0),
    ADD CONSTRAINT tenants_tier CHECK (tier IN ('trial', 'growth', 'scale'));

-- The admin API acts for one tenant at a time under row-level security (its policy binds
-- `tenants` by id): creating a tenant, suspending and resuming it are writes of that tenant's
-- own row, so the application role may insert and update rows of `tenants`; which caller may
-- ask is the route's permission (`tenants:manage`).
GRANT INSERT, UPDATE ON tenants TO switchyard_app;

-- The one cross-tenant read of the admin API: the list of tenants, for platform
-- administrators. As switchyard_find_key in 005_isolation.sql: a definer function, in
-- platform scope for its one query, with a search path no caller can put objects into.
CREATE FUNCTION switchyard_list_tenants()
RETURNS SETOF tenants
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, public, pg_temp
AS $$
DECLARE
    before text := current_setting('app.platform', true);
BEGIN
    PERFORM set_config('app.platform', 'on', true);
    RETURN QUERY SELECT * FROM public.tenants;
    PERFORM set_config('app.platform', coalesce(before, ''), true);
END
$$;
REVOKE ALL ON FUNCTION switchyard_list_tenants() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION switchyard_list_tenants() TO switchyard_app;
