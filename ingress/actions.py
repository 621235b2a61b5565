"""The one place the admin API reports what a caller did to tenants and keys (a tenant
created, suspended or resumed; a key created, rotated or revoked).

Today a log line; the audit trail (`audit.events`) records these same actions through this
one function, so no handler has to remember it. Never pass a secret: `details` are ids,
names and times.
"""

from __future__ import annotations

import logging
from typing import Any

from ingress.call import Call

log = logging.getLogger(__name__)


def record_action(call: Call, action: str, *, tenant_id: str, target: str,
                  **details: Any) -> None:
    """`action` (e.g. "api_key.revoked") by the caller, on `target` (a key or tenant id) of
    `tenant_id`."""
    actor = call.principal
    log.info("%s: %s of tenant %s by key %s (tenant %s)%s", action, target, tenant_id,
             actor.key_id, actor.tenant_id,
             "".join(f", {name}={value}" for name, value in details.items()))
