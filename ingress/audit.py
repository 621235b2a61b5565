"""The audit trail at the edge: `AuditLog.record`, the one call every security- or
money-relevant action makes before it answers, and GET /v1/audit, the tenant's trail.

An action's handler commits its change, then `await call.services.audit.record(call,
"vault.key_stored", target=..., details={...})`, then answers: the event is on Kafka
(acknowledged by every in-sync replica) before the client hears of the change. If Kafka does
not take it, the client gets 503 `audit_unavailable` saying the change was applied, and the
event is written to this process's log in full (docs/audit.md: what is guaranteed and what is
not). The event's contract and the row hash are `topics/audit.py`; the chains and their
queries, `state/audit.py`; the writer, `workers/audit/`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Counter
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from starlette.responses import Response

from ingress.pipeline import request_traceparent
from ingress.validation import parse_model
from state.audit import AuditQuery, list_entries
from state.runtime import OUTAGE_RETRY_AFTER_S
from topics import names
from topics.audit import AuditAction, AuditEvent, new_event, rfc3339, trace_id_of
from topics.errors import Unavailable, Unprocessable

if TYPE_CHECKING:  # ingress/call.py imports ingress/services.py, which imports this module
    from ingress.call import Call

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
_CURSOR_PREFIX = "audit:v1:"


class AuditLog:
    """Publishes audit events to `audit.events`, keyed by tenant (one partition per tenant:
    its events stay in order)."""

    def __init__(self, producer: AIOKafkaProducer, *, publish_timeout_s: float,
                 registry: CollectorRegistry) -> None:
        self._producer = producer
        self._timeout_s = publish_timeout_s
        self._failures = Counter(
            "switchyard_audit_publish_failures", "Audit events Kafka did not take: the "
            "action was applied, its event is only in the ingress's log", registry=registry)

    async def record(self, call: Call, action: AuditAction, *, target: str | None = None,
                     details: Mapping[str, Any] | None = None, tenant_id: str | None = None,
                     actor: str | None = None, actor_role: str | None = None) -> AuditEvent:
        """Record that `action` happened, once Kafka has the event. The tenant and actor are
        the caller's (its API key, and that key's role) unless given: a public route (login)
        or a platform action names them. `details` say what changed, never a secret
        (topics/audit.py refuses fields named like one). Raises 503 `audit_unavailable` if
        Kafka does not take the event."""
        caller = call.caller
        if tenant_id is None or actor is None:
            if caller is None:
                raise RuntimeError(f"audit {action}: a route without a caller must name the "
                                   "tenant and the actor")
            tenant_id = tenant_id or caller.tenant_id
            actor = actor or caller.key_id
            actor_role = actor_role or caller.role.value
        request = call.request
        event = new_event(
            tenant_id=tenant_id, actor=actor, actor_role=actor_role, action=action,
            target=target, details=dict(details or {}), request_id=call.request_id,
            trace_id=trace_id_of(request_traceparent(request)),
            source_ip=request.client.host if request.client else None)
        await self.publish(event, request_traceparent(request))
        return event

    async def publish(self, event: AuditEvent, traceparent: str | None = None) -> None:
        payload = event.to_json()
        headers = [(names.H_TENANT_ID, event.tenant_id.encode()),
                   (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)]
        if event.request_id:
            headers.append((names.H_REQUEST_ID, event.request_id.encode()))
        if traceparent:
            headers.append((names.H_TRACEPARENT, traceparent.encode()))
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._producer.send_and_wait(
                    names.AUDIT, payload, key=event.tenant_id.encode(), headers=headers)
        except (KafkaError, TimeoutError) as exc:
            self._failures.inc()
            # The change is committed; the log keeps the event (it holds no secret) so that it
            # can still be published by hand: never lost without a trace.
            log.error("audit event not published (%r); the action was applied: %s", exc,
                      payload.decode())
            # Retrying is safe: the change is stored as asked, and a repeat that goes through
            # records itself.
            raise Unavailable(
                f"the change was applied, but its audit record could not be published "
                f"({type(exc).__name__}); the record is kept in the gateway's log",
                code="audit_unavailable", retry_after_s=OUTAGE_RETRY_AFTER_S) from exc


class _Query(BaseModel):
    # Query parameters are text: lax, so "50" is a number. Unknown ones are typos (a filter
    # that silently does not apply would show more than was asked for).
    model_config = ConfigDict(extra="forbid")

    limit: int = Field(default=DEFAULT_LIMIT, ge=1, le=MAX_LIMIT)
    action: str | None = Field(default=None, min_length=1, max_length=64)
    actor: str | None = Field(default=None, min_length=1, max_length=256)
    since: AwareDatetime | None = None
    until: AwareDatetime | None = None
    cursor: str | None = None

    @field_validator("since", "until", mode="before")
    @classmethod
    def _plus_sign(cls, value: Any) -> Any:
        # An unescaped "+01:00" arrives as " 01:00" (a "+" in a query string is a space).
        return value.replace(" ", "+") if isinstance(value, str) else value


def _cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"{_CURSOR_PREFIX}{seq}".encode()).decode().rstrip("=")


def _before_seq(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        seq = int(text.removeprefix(_CURSOR_PREFIX)) if text.startswith(_CURSOR_PREFIX) else 0
    except (binascii.Error, UnicodeDecodeError, ValueError):
        seq = 0
    if seq < 1:
        raise Unprocessable("cursor: not a cursor this API returned (use `next_cursor`)",
                            code="invalid_field", param="cursor")
    return seq


async def list_audit(call: Call) -> Response:
    """The tenant's audit trail, newest first: `?limit=50&action=&actor=&since=&until=&cursor=`
    (RFC 3339 times; `next_cursor` pages on)."""
    params = dict(call.request.query_params)
    query = parse_model(_Query, params)
    page = await list_entries(call.services.pool, AuditQuery(
        tenant_id=call.principal.tenant_id, limit=query.limit, action=query.action,
        actor=query.actor, since=query.since, until=query.until,
        before_seq=_before_seq(query.cursor) if query.cursor is not None else None))
    entries = [_entry(row) for row in page.rows]
    next_cursor = _cursor(page.rows[-1]["seq"]) if page.has_more else None
    body = orjson.dumps({"object": "list", "entries": entries, "has_more": page.has_more,
                         "next_cursor": next_cursor})
    return Response(body, media_type="application/json")


def _entry(row: asyncpg.Record) -> dict[str, Any]:
    occurred: datetime = row["occurred_at"]
    return {
        "id": str(row["event_id"]), "object": "audit.entry", "action": row["action"],
        "timestamp": rfc3339(occurred), "user": row["actor"], "actor_role": row["actor_role"],
        "target": row["target"],
        # The stored text as it is: it is JSON already, and the one the hash covers.
        "details": orjson.Fragment(row["details"]),
        "request_id": row["request_id"], "trace_id": row["trace_id"],
        "source_ip": row["source_ip"], "seq": row["seq"], "hash": row["hash"],
    }
