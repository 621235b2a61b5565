"""Every HTTP route of the ingress, once: method, path, handler, and the permission it
requires (`topics/identity.py`; PUBLIC: none).

Adding a route is a handler (`async def handler(call: Call) -> Response`, see
`ingress/call.py`) plus one line here. Nothing else lists routes: the app, the metrics'
route labels and the generated API reference (`docs/api.md`) all read this table.
"""

from __future__ import annotations

from ingress import (
    audit,
    budgets,
    chat,
    embeddings,
    insights,
    keys,
    limits,
    messages,
    ops,
    responses,
    routing_policy,
    routing_preview,
    sessions,
    tenant_providers,
    tenants,
    usage,
    vault,
)
from ingress.call import PUBLIC, Endpoint
from topics.identity import Permission as P

ROUTES: tuple[Endpoint, ...] = (
    Endpoint("POST", "/v1/chat/completions", chat.chat_completions, P.INFERENCE),
    Endpoint("POST", "/v1/infer", chat.chat_completions, P.INFERENCE),  # the seed's name
    Endpoint("POST", "/v1/messages", messages.messages, P.INFERENCE),  # Anthropic's protocol
    Endpoint("POST", "/v1/messages/count_tokens", messages.count_tokens, P.INFERENCE),
    Endpoint("POST", "/v1/responses", responses.create_response, P.INFERENCE),  # OpenAI's
    Endpoint("GET", "/v1/responses/{response_id}", responses.get_response, P.INFERENCE),
    Endpoint("DELETE", "/v1/responses/{response_id}", responses.delete_response, P.INFERENCE),
    Endpoint("POST", "/v1/embeddings", embeddings.embeddings, P.INFERENCE),
    Endpoint("GET", "/v1/models", ops.models, P.MODELS_READ),
    Endpoint("GET", "/v1/advisor", insights.advisor, P.USAGE_READ),
    Endpoint("POST", "/v1/feedback", insights.feedback, P.INFERENCE),
    Endpoint("GET", "/v1/providers/stats", insights.stats, P.USAGE_READ),
    # The tenant's own providers (the seed product's routes): `ingress/tenant_providers.py`.
    Endpoint("POST", "/v1/providers/register", tenant_providers.register_provider,
             P.PROVIDERS_MANAGE),
    Endpoint("GET", "/v1/providers", tenant_providers.list_providers, P.PROVIDERS_READ),
    Endpoint("POST", "/v1/providers/test", tenant_providers.test_provider, P.PROVIDERS_MANAGE),
    Endpoint("PUT", "/v1/providers/{provider_id}", tenant_providers.update_provider,
             P.PROVIDERS_MANAGE),
    Endpoint("DELETE", "/v1/providers/{provider_id}", tenant_providers.delete_provider,
             P.PROVIDERS_MANAGE),
    Endpoint("GET", "/v1/providers/{provider_id}/health", tenant_providers.provider_health,
             P.PROVIDERS_READ),
    # The whole tenant's usage: `usage:read` (a key's own usage would be `usage:read_own`).
    Endpoint("GET", "/v1/usage", usage.usage, P.USAGE_READ_OWN),
    Endpoint("GET", "/v1/usage/history", usage.usage_history, P.USAGE_READ_OWN),
    Endpoint("POST", "/v1/vault/keys", vault.store_key, P.VAULT_MANAGE),
    Endpoint("GET", "/v1/vault/keys", vault.list_keys, P.VAULT_MANAGE),
    Endpoint("POST", "/v1/vault/keys/{provider}/rotate", vault.rotate_key, P.VAULT_MANAGE),
    Endpoint("DELETE", "/v1/vault/keys/{provider}", vault.delete_key, P.VAULT_MANAGE),
    Endpoint("GET", "/v1/routing/policy", routing_policy.get_policy, P.POLICY_READ),
    Endpoint("PUT", "/v1/routing/policy", routing_policy.put_policy, P.POLICY_WRITE),
    Endpoint("DELETE", "/v1/routing/policy", routing_policy.delete_policy, P.POLICY_WRITE),
    # What routing would do with a request, without calling a provider.
    Endpoint("POST", "/v1/routing/preview", routing_preview.preview, P.INFERENCE),
    Endpoint("GET", "/v1/audit", audit.list_audit, P.AUDIT_READ),
    Endpoint("POST", "/v1/tenants/{tenant_id}/budget", budgets.set_budget, P.BUDGET_MANAGE),
    Endpoint("GET", "/v1/tenants/{tenant_id}/budgets", budgets.list_budgets, P.BUDGET_MANAGE),
    Endpoint("PUT", "/v1/tenants/{tenant_id}/budgets", budgets.put_budgets, P.BUDGET_MANAGE),
    Endpoint("DELETE", "/v1/tenants/{tenant_id}/budgets", budgets.delete_budget,
             P.BUDGET_MANAGE),
    Endpoint("POST", "/v1/tenants/{tenant_id}/api-keys", keys.create_api_key, P.KEYS_MANAGE),
    Endpoint("GET", "/v1/tenants/{tenant_id}/api-keys", keys.list_api_keys, P.KEYS_MANAGE),
    Endpoint("DELETE", "/v1/tenants/{tenant_id}/api-keys/{key_id}", keys.revoke_api_key,
             P.KEYS_MANAGE),
    Endpoint("POST", "/v1/tenants/{tenant_id}/api-keys/{key_id}/rotate", keys.rotate_api_key,
             P.KEYS_MANAGE),
    Endpoint("GET", "/v1/tenants/{tenant_id}/limits", limits.get_limits, P.USAGE_READ),
    Endpoint("PUT", "/v1/tenants/{tenant_id}/limits", limits.put_limits, P.LIMITS_MANAGE),
    Endpoint("POST", "/v1/admin/tenants", tenants.create_tenant, P.TENANTS_MANAGE),
    Endpoint("GET", "/v1/admin/tenants", tenants.list_tenants, P.TENANTS_MANAGE),
    Endpoint("POST", "/v1/admin/tenants/{tenant_id}/suspend", tenants.suspend_tenant,
             P.TENANTS_MANAGE),
    Endpoint("POST", "/v1/admin/tenants/{tenant_id}/resume", tenants.resume_tenant,
             P.TENANTS_MANAGE),
    # Public: the API key comes in the body and is checked there (`ingress/sessions.py`).
    Endpoint("POST", "/v1/auth/login", sessions.login, PUBLIC),
    Endpoint("POST", "/v1/auth/refresh", sessions.refresh, P.SESSION),
    Endpoint("POST", "/v1/auth/logout", sessions.logout, P.SESSION),
    Endpoint("GET", "/v1/health", ops.health, PUBLIC),
    Endpoint("GET", "/healthz", ops.healthz, PUBLIC),
    Endpoint("GET", "/readyz", ops.readyz, PUBLIC),
    Endpoint("GET", "/metrics", ops.metrics, PUBLIC),
)


def metric_paths() -> frozenset[str]:
    """The paths that get their own metrics label; templated paths and unknown ones share
    "other" (label values stay bounded whatever clients send)."""
    return frozenset(e.path for e in ROUTES if "{" not in e.path)
