-- The daily rollup by provider too: one row per (tenant, day, model, provider). A model is not
-- always served by its catalog provider (the offline fallback, a future second host), so the
-- provider breakdown of GET /v1/usage/history cannot be inferred from the model; without this
-- column it would have to scan the ledger for the whole range.
--
-- The rollup is rebuilt from the ledger, which it must always equal. The ledger is locked
-- against writes meanwhile (SHARE: usage workers' inserts wait), so no event can be counted
-- twice or missed; a usage worker still running the old statement, whose ON CONFLICT names
-- the old key, then fails and retries its batch (at-least-once, idempotent by event_id) once
-- it runs the new code.

-- Row-level security binds the owner too (005_isolation.sql): this transaction acts for the
-- platform, or the rebuild would see and write no row.
SELECT set_config('app.platform', 'on', true);

LOCK TABLE usage_events IN SHARE MODE;
LOCK TABLE usage_daily IN ACCESS EXCLUSIVE MODE;

ALTER TABLE usage_daily DROP CONSTRAINT usage_daily_pkey;
ALTER TABLE usage_daily ADD COLUMN provider text;
DELETE FROM usage_daily;
INSERT INTO usage_daily (tenant_id, day, model, provider, requests, attempts, prompt_tokens,
                         completion_tokens, cached_tokens, cost_usd)
SELECT tenant_id, (started_at AT TIME ZONE 'UTC')::date, model, provider,
       count(*) FILTER (WHERE attempt = 1), count(*), sum(prompt_tokens),
       sum(completion_tokens), sum(cached_tokens), sum(cost_usd)
FROM usage_events
GROUP BY 1, 2, 3, 4;
ALTER TABLE usage_daily ALTER COLUMN provider SET NOT NULL;
ALTER TABLE usage_daily ADD PRIMARY KEY (tenant_id, day, model, provider);
