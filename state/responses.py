"""Stored Responses (`topics/responses.py` describes the record): what `previous_response_id`
continues and `GET /v1/responses/{id}` returns, in Redis, per tenant, for a TTL.

The tenant is part of every key, so a response id of another tenant is simply not found;
nothing lists keys. Redis runs without persistence in this stack: a restart of Redis forgets
stored responses, as their TTL would later (docs/api.md says so). Written by the ingress
(`ingress/responses.py`) after an answer is complete, never for `store: false`."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as redis

_KEY = "sy:resp:"


def _key(tenant_id: str, response_id: str) -> str:
    return f"{_KEY}{tenant_id}:{response_id}"


async def save(client: redis.Redis, tenant_id: str, response_id: str, record: dict[str, Any],
               ttl_s: int) -> None:
    await client.set(_key(tenant_id, response_id), orjson.dumps(record), ex=ttl_s)


async def load(client: redis.Redis, tenant_id: str, response_id: str) -> dict[str, Any] | None:
    raw = await client.get(_key(tenant_id, response_id))
    if raw is None:
        return None
    record = orjson.loads(raw)
    return record if isinstance(record, dict) else None


async def delete(client: redis.Redis, tenant_id: str, response_id: str) -> bool:
    """True if the response was there."""
    return bool(await client.delete(_key(tenant_id, response_id)))
