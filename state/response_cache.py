"""The response cache's entries in Redis: one string per entry, `rc:<tenant id>:<digest>`
(the digest of `topics/response_cache.py` `cache_key`, which covers the tenant too), holding
the stored answer's JSON, expiring with the entry's TTL (Redis's own `EX`: nothing to sweep).

An entry is `{"completion": <chat completion>, "metadata": {"provider", "model", "mode"},
"stored_at_ms"}`. Errors are the caller's to handle (`ingress/response_cache.py` treats any
failure as a miss: the cache never fails a request).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as redis

PREFIX = "rc:"


def entry_key(tenant_id: str, digest: str) -> str:
    return f"{PREFIX}{tenant_id}:{digest}"


@dataclass(frozen=True, slots=True)
class Entry:
    completion: dict[str, Any]
    metadata: dict[str, Any]
    stored_at_ms: int


def encode(completion: dict[str, Any], metadata: dict[str, Any]) -> bytes:
    return orjson.dumps({"completion": completion, "metadata": metadata,
                         "stored_at_ms": int(time.time() * 1000)})


async def get_entry(client: redis.Redis, tenant_id: str, digest: str) -> Entry | None:
    """The entry, or None: never stored, expired, or unreadable (written by another version)."""
    raw = await client.get(entry_key(tenant_id, digest))
    if raw is None:
        return None
    try:
        decoded = orjson.loads(raw)
        return Entry(dict(decoded["completion"]), dict(decoded["metadata"]),
                     int(decoded["stored_at_ms"]))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None


async def put_entry(client: redis.Redis, tenant_id: str, digest: str, encoded: bytes,
                    ttl_s: int) -> None:
    """Store (or replace) the entry for `ttl_s` seconds."""
    await client.set(entry_key(tenant_id, digest), encoded, ex=ttl_s)
