"""Who may do what: roles, the permissions each route requires, and the principal a request
acts as.

The other files of the feature: `state/keys.py` stores keys with their role and limits,
`ingress/auth.py` turns a bearer credential (an API key or a session token) into a
`Principal`, `ingress/call.py` checks the permission each route of `ingress/routes.py`
states before its handler runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from topics.errors import Forbidden


class Permission(StrEnum):
    """What a route requires of its caller; the value is the name a 403 reports."""

    INFERENCE = "inference"  # chat completions, embeddings, feedback on answers
    MODELS_READ = "models:read"
    USAGE_READ_OWN = "usage:read_own"  # the caller's own key's usage
    USAGE_READ = "usage:read"  # the whole tenant's usage, spend and provider stats
    AUDIT_READ = "audit:read"
    POLICY_READ = "policy:read"
    POLICY_WRITE = "policy:write"
    VAULT_MANAGE = "vault:manage"  # the tenant's own provider keys
    PROVIDERS_READ = "providers:read"  # the tenant's registered providers, their health
    PROVIDERS_MANAGE = "providers:manage"  # register, test, change, delete them
    KEYS_MANAGE = "keys:manage"  # the tenant's API keys
    BUDGET_MANAGE = "budget:manage"
    LIMITS_MANAGE = "limits:manage"  # the tenant's and its keys' rate limits
    SESSION = "session"  # log in, refresh, log out
    TENANTS_MANAGE = "tenants:manage"  # platform: create, suspend, resume tenants


class Role(StrEnum):
    PLATFORM_ADMIN = "platform_admin"
    TENANT_ADMIN = "tenant_admin"
    MEMBER = "member"
    VIEWER = "viewer"
    BILLING = "billing"


_READ = frozenset({Permission.MODELS_READ, Permission.SESSION, Permission.USAGE_READ_OWN})

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.PLATFORM_ADMIN: frozenset(Permission),
    Role.TENANT_ADMIN: frozenset(Permission) - {Permission.TENANTS_MANAGE},
    Role.MEMBER: _READ | {Permission.INFERENCE},
    Role.VIEWER: _READ | {Permission.USAGE_READ, Permission.AUDIT_READ,
                          Permission.POLICY_READ, Permission.PROVIDERS_READ},
    Role.BILLING: _READ | {Permission.USAGE_READ, Permission.AUDIT_READ,
                           Permission.BUDGET_MANAGE},
}


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: its tenant, the API key it holds (or its session was
    opened with), that key's role and the models the key is limited to (None: any)."""

    tenant_id: str
    key_id: str
    role: Role = Role.MEMBER
    allowed_models: frozenset[str] | None = None
    session_id: str | None = None  # the session token's id, when it came with one

    def can(self, permission: Permission) -> bool:
        return permission in ROLE_PERMISSIONS[self.role]

    def require(self, permission: Permission) -> None:
        if not self.can(permission):
            raise Forbidden(f"the role {self.role.value!r} lacks the permission "
                            f"{permission.value!r}", code="permission_denied")

    def may_grant(self, role: Role) -> bool:
        """Whether this caller may create (or rotate, or revoke) a key of `role`: only one
        whose permissions are all its own, so no key outranks the one that made it."""
        return ROLE_PERMISSIONS[role] <= ROLE_PERMISSIONS[self.role]

    def require_model(self, model: str) -> None:
        """A key limited to some models may not ask for another (checked before routing)."""
        if self.allowed_models is not None and model not in self.allowed_models:
            raise Forbidden(f"this API key may not use the model {model!r}",
                            code="model_not_allowed", param="model")
