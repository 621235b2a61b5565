"""The one place the admin API records what a caller did to tenants and keys (a tenant
created, suspended or resumed; a key created, rotated or revoked): an event of the audit
trail (`ingress/audit.py`, `audit.events`), durable before the action is answered. Never
pass a secret: `details` are ids, names and times (topics/audit.py refuses secret-like
fields).

A platform administrator's action on a tenant is recorded in that tenant's chain, with the
administrator's key as its actor.
"""

from __future__ import annotations

from typing import Any

from ingress.call import Call
from topics.audit import AuditAction


async def record_action(call: Call, action: AuditAction, *, tenant_id: str, target: str,
                        **details: Any) -> None:
    """`action` by the caller on `target` (a key or tenant id) of `tenant_id`."""
    await call.services.audit.record(call, action, target=target, details=details,
                                     tenant_id=tenant_id)
