-- The response cache (docs/cache.md): a request answered from the cache is billed as one
-- ledger row at cost 0, marked here. Existing rows were all answered by a provider.
ALTER TABLE usage_events ADD COLUMN cache_hit boolean NOT NULL DEFAULT false;
