-- Spend budgets (topics/budgets.py, state/budgets.py): per tenant (key_id NULL) or per key,
-- per UTC day or month, hard (402 at the limit) or soft (alerts only). A tenant without a
-- tenant-month row here falls back to tenants.monthly_budget_usd, else its tier's budget
-- (topics/tenants.py), hard when the tier says so.

CREATE TABLE budgets (
    tenant_id text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    -- '' for the tenant's own budget: a primary key column cannot be NULL.
    key_id text NOT NULL DEFAULT '',
    period text NOT NULL CHECK (period IN ('day', 'month')),
    limit_usd numeric(20, 6) NOT NULL CHECK (limit_usd > 0 AND limit_usd <= 1000000),
    hard boolean NOT NULL DEFAULT true,
    alert_threshold_pct int CHECK (alert_threshold_pct BETWEEN 1 AND 100),
    webhook_url text,
    fail_open boolean NOT NULL DEFAULT false,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, key_id, period)
);

GRANT SELECT, INSERT, UPDATE, DELETE ON budgets TO switchyard_app;

ALTER TABLE budgets ENABLE ROW LEVEL SECURITY, FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON budgets
    USING (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''))
    WITH CHECK (tenant_id = NULLIF(current_setting('app.tenant_id', true), ''));
CREATE POLICY platform ON budgets TO CURRENT_USER
    USING (current_setting('app.platform', true) = 'on')
    WITH CHECK (current_setting('app.platform', true) = 'on');
