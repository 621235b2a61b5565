-- Tenants managed through the admin API (state/tenants.py): a tier among the seed's, and a
-- monthly budget of the tenant's own (NULL: its tier's), enforced by the limits of issue 18.

ALTER TABLE tenants
    ADD COLUMN monthly_budget_usd numeric(20, 6) CHECK (monthly_budget_usd > 0),
    ADD CONSTRAINT tenants_tier CHECK (tier IN ('trial', 'growth', 'scale'));
