"""The audit trail's contract: the `audit.events` message (`AuditEvent`), the action names, and
the hash that chains a tenant's rows (`row_hash`), so that any reader can check a chain.

Every security- or money-relevant action becomes one `AuditEvent`, published by the ingress
before it answers (`ingress/audit.py`, `AuditLog.record`); `workers/audit/` writes each event
once into PostgreSQL, appended to its tenant's hash chain (`state/audit.py`); `GET /v1/audit`
reads them back and `switchyard audit verify` (compose/cli.py) recomputes the chains. The JSON
Schema is published in `topics/schemas/audit.v1.json`. docs/audit.md says it all in prose.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

import orjson
from pydantic import AwareDatetime, ConfigDict, Field, field_validator

from topics.messages import SCHEMA_VERSION, _Message

# The actions the gateway records. A reader accepts any dotted lowercase name (a newer
# producer may record an action this version does not know); a producer in this repository
# names one of these, so a typo fails the type check instead of starting a new action.
AuditAction = Literal[
    "auth.login", "auth.refresh", "auth.logout",
    "key.created", "key.rotated", "key.revoked",
    "tenant.created", "tenant.suspended", "tenant.resumed",
    "vault.key_stored", "vault.key_rotated", "vault.key_deleted",
    "routing_policy.updated", "routing_policy.deleted",
    "budget.updated", "budget.alert",
    "limits.updated",
    "provider.registered", "provider.updated", "provider.deleted",
]
ACTIONS: tuple[str, ...] = get_args(AuditAction)

# The actor of what the platform does by itself or through its operators' tools (a tenant
# created by `switchyard` commands), rather than through one of the tenant's keys or users.
PLATFORM_ACTOR = "platform"

# The `prev_hash` of a chain's first row.
GENESIS_HASH = "0" * 64
# Which canonical encoding `row_hash` uses; part of what is hashed, so a later encoding can
# never be mistaken for this one.
HASH_VERSION = 1

MAX_DETAILS_BYTES = 16_384
MAX_DETAILS_DEPTH = 8
_ACTION = r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$"
_TRACE_ID = re.compile(r"[0-9a-f]{32}")
# Field names that would mean a secret is being recorded. Details describe what changed and
# how to tell things apart (a provider, a key id, a key's last four characters), never the
# secret itself: the audit trail is read by more people than the vault.
SECRET_FIELDS = frozenset({
    "api_key", "apikey", "key", "secret", "client_secret", "password", "passphrase", "token",
    "access_token", "refresh_token", "id_token", "jwt", "authorization", "private_key",
    "master_key", "ciphertext", "nonce", "credentials",
})


class AuditEvent(_Message):
    """`audit.events`: one security- or money-relevant action, as it happened. Keyed by
    tenant on the topic, so a tenant's events keep their order. JSON Schema published in
    `topics/schemas/audit.v1.json`."""

    # A refused event's error never repeats its values: a field that should not be there
    # may be a secret.
    model_config = ConfigDict(hide_input_in_errors=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    # The idempotency key: a redelivered event is written once. Required on the wire (a
    # reader that made one up would write each delivery anew): `new_event` draws it.
    event_id: uuid.UUID
    # Whose audit trail (and hash chain) the event belongs to; a platform action on a
    # tenant (created, suspended) belongs to that tenant's.
    tenant_id: str = Field(min_length=1, max_length=128)
    # Who did it: an API key id, a user id, or "platform".
    actor: str = Field(min_length=1, max_length=256)
    actor_role: str | None = Field(default=None, max_length=64)
    action: str = Field(pattern=_ACTION, max_length=64)
    # What it was done to: a provider, a key id, a tenant id.
    target: str | None = Field(default=None, max_length=512)
    # What changed (never a secret: see SECRET_FIELDS).
    details: dict[str, Any] = Field(default_factory=dict)
    request_id: str | None = Field(default=None, max_length=128)
    trace_id: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")
    source_ip: str | None = Field(default=None, max_length=64)
    occurred_at: AwareDatetime

    @field_validator("details")
    @classmethod
    def _no_secrets(cls, value: dict[str, Any]) -> dict[str, Any]:
        if problem := _details_problem(value, MAX_DETAILS_DEPTH):
            raise ValueError(problem)
        try:
            size = len(canonical_details(value))
        except TypeError as exc:  # a Python caller's Decimal or object: not JSON
            raise ValueError(f"must be JSON: {exc}") from None
        if size > MAX_DETAILS_BYTES:
            raise ValueError(f"must be at most {MAX_DETAILS_BYTES} bytes of JSON")
        return value


def new_event(**fields: Any) -> AuditEvent:
    """An event under a fresh id, happening now unless `occurred_at` says otherwise."""
    return AuditEvent(**{"event_id": uuid.uuid4(), "occurred_at": datetime.now(UTC), **fields})


def _details_problem(value: Any, depth: int) -> str | None:
    if isinstance(value, str):
        # PostgreSQL's text cannot hold NUL.
        return "must not contain NUL characters" if "\x00" in value else None
    children: list[Any] = []
    if isinstance(value, dict):
        for name in value:
            if name.lower().replace("-", "_") in SECRET_FIELDS:
                return f"must not carry secrets: field {name[:64]!r}"
        children = [*value, *value.values()]
    elif isinstance(value, list):
        children = value
    if children and depth == 0:
        return f"must not nest deeper than {MAX_DETAILS_DEPTH} levels"
    return next(filter(None, (_details_problem(c, depth - 1) for c in children)), None)


def trace_id_of(traceparent: str | None) -> str | None:
    """The trace id of a W3C `traceparent` header, or None if there is none or it is not one."""
    if not traceparent:
        return None
    parts = traceparent.strip().split("-")
    if len(parts) != 4 or not _TRACE_ID.fullmatch(parts[1]) or parts[1] == "0" * 32:
        return None
    return parts[1]


def canonical_details(details: dict[str, Any]) -> str:
    """The text a row stores for its details: JSON, keys sorted at every level, no spaces."""
    return orjson.dumps(details, option=orjson.OPT_SORT_KEYS).decode()


def rfc3339(moment: datetime) -> str:
    """UTC, microseconds (what PostgreSQL keeps), `Z`: one text per instant."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class ChainRow:
    """One row of a tenant's audit chain: every stored column but the hash itself."""

    event_id: str
    tenant_id: str
    seq: int  # 1, 2, 3... per tenant, no gaps
    occurred_at: datetime
    recorded_at: datetime
    actor: str
    actor_role: str | None
    action: str
    target: str | None
    details: str  # canonical_details(...), exactly as stored
    request_id: str | None
    trace_id: str | None
    source_ip: str | None
    prev_hash: str  # the previous row's hash; GENESIS_HASH for seq 1


def row_hash(row: ChainRow) -> str:
    """SHA-256 (hex) of the row's canonical encoding: a JSON object of every field above plus
    `v` (HASH_VERSION), keys sorted, no spaces, UTF-8, timestamps as `rfc3339`, `details` as
    the stored text. A changed field, or a changed `prev_hash`, changes the hash."""
    fields = {
        "v": HASH_VERSION, "event_id": row.event_id, "tenant_id": row.tenant_id,
        "seq": row.seq, "occurred_at": rfc3339(row.occurred_at),
        "recorded_at": rfc3339(row.recorded_at), "actor": row.actor,
        "actor_role": row.actor_role, "action": row.action, "target": row.target,
        "details": orjson.Fragment(row.details), "request_id": row.request_id,
        "trace_id": row.trace_id, "source_ip": row.source_ip, "prev_hash": row.prev_hash,
    }
    return hashlib.sha256(orjson.dumps(fields, option=orjson.OPT_SORT_KEYS)).hexdigest()


def audit_json_schema() -> dict[str, Any]:
    """The JSON Schema published for outside consumers of `audit.events` (a SIEM)."""
    schema = AuditEvent.model_json_schema(mode="serialization")
    schema["$id"] = "https://switchyard.dev/schemas/audit.v1.json"
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
