-- Tenants' own provider API keys, encrypted with AES-256-GCM (state/vault.py). Never the key
-- in clear: the ciphertext is bound to (tenant_id, provider) by its associated data, and
-- master_key_id names the master key that encrypted it, so master keys can be rolled.

CREATE TABLE provider_keys (
    tenant_id      text NOT NULL REFERENCES tenants (id) ON DELETE CASCADE,
    provider       text NOT NULL,
    master_key_id  text NOT NULL,
    nonce          bytea NOT NULL CHECK (octet_length(nonce) = 12),  -- fresh per encryption
    ciphertext     bytea NOT NULL,        -- includes the 16-byte GCM tag
    last4          text NOT NULL,         -- last characters, so a person can tell keys apart
    config         jsonb NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(config) = 'object'),
    created_at     timestamptz NOT NULL DEFAULT now(),
    rotated_at     timestamptz,           -- last time the tenant replaced the key
    PRIMARY KEY (tenant_id, provider)
);
