-- Tenants' routing policies (topics/routing_policy.py, state/routing_policy.py). One row per
-- tenant that stored one; no row means the default policy. The JSON is the policy exactly as
-- validated by the API (RoutingPolicy.public()), so a reader re-validates it on the way out.

CREATE TABLE routing_policies (
    tenant_id   text PRIMARY KEY REFERENCES tenants (id) ON DELETE CASCADE,
    policy      jsonb NOT NULL CHECK (jsonb_typeof(policy) = 'object'),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
