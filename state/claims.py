"""Request claims and worker liveness in Redis: what makes at-least-once delivery execute a
request at most once.

A router claims a request id before calling a provider. A redelivered request (consumer
crash, rebalance) then finds the claim and is not executed again. If the claim's owner is
no longer alive, the request was interrupted mid-call: exactly one worker reports that to the
client instead of silently re-running a call the provider may already have billed.

Who uses them: `workers/router/worker.py` claims and finishes each request
(`workers/router/main.py` keeps the worker's liveness); the ingress marks a request whose
client left with `publish_cancel` (`ingress/pipeline.py`), and `workers/router/cancel.py`
stops its attempts.
"""

from __future__ import annotations

import enum
from typing import Any

import redis.asyncio as redis

from state.runtime import outage
from topics import names
from topics.messages import CancelRequest

_CLAIM = "sy:claim:"
_ALIVE = "sy:alive:"
_CANCELLED = "sy:cancelled:"

# One round trip, atomic: cancelled? claimed? by whom, and is that worker alive?
# The liveness key is read by computed name, which is fine on a single Redis node (not Cluster).
_CLAIM_LUA = """
if redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', ''} end
local cur = redis.call('GET', KEYS[1])
if not cur then
  redis.call('SET', KEYS[1], 'run:' .. ARGV[1], 'PX', ARGV[2])
  return {'claimed', ''}
end
if cur == 'done' then return {'done', ''} end
local owner = string.sub(cur, 5)
if owner == ARGV[1] or redis.call('EXISTS', ARGV[3] .. owner) == 1 then
  return {'running', owner}
end
redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
return {'orphaned', owner}
"""


class ClaimResult(enum.Enum):
    CLAIMED = "claimed"  # ours to execute
    DONE = "done"  # already answered; skip silently
    RUNNING = "running"  # a live worker is executing it; it will answer
    ORPHANED = "orphaned"  # its worker died mid-call; we must report the interruption
    CANCELLED = "cancelled"  # the client went away before it started


class Claims:
    def __init__(self, client: redis.Redis, *, worker_id: str, claim_ttl_s: int,
                 heartbeat_ttl_ms: int) -> None:
        self._redis = client
        self._worker_id = worker_id
        self._claim_ttl_ms = claim_ttl_s * 1000
        self._heartbeat_ttl_ms = heartbeat_ttl_ms
        self._claim_script: Any = client.register_script(_CLAIM_LUA)

    @property
    def worker_id(self) -> str:
        return self._worker_id

    async def heartbeat(self) -> None:
        await self._redis.set(_ALIVE + self._worker_id, b"1", px=self._heartbeat_ttl_ms)

    async def retire(self) -> None:
        await self._redis.delete(_ALIVE + self._worker_id)

    async def claim(self, request_id: str) -> tuple[ClaimResult, str]:
        """Try to claim `request_id`; returns the outcome and, if relevant, the owner. Raises
        `state_unavailable` (503) when Redis cannot be reached: without a claim, a request
        that another live worker runs could run twice, so none is taken blind."""
        try:
            status, owner = await self._claim_script(
                keys=[_CLAIM + request_id, _CANCELLED + request_id],
                args=[self._worker_id, self._claim_ttl_ms, _ALIVE],
            )
        except Exception as exc:
            # Only an outage is a 503; a bad script or reply is a bug and stays one.
            if (down := outage(exc)) is None:
                raise
            raise down from exc
        return ClaimResult(_text(status)), _text(owner)

    async def finish(self, request_id: str) -> None:
        await self._redis.set(_CLAIM + request_id, b"done", px=self._claim_ttl_ms)

    async def mark_cancelled(self, request_id: str) -> None:
        await self._redis.set(_CANCELLED + request_id, b"1", px=self._claim_ttl_ms)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def publish_cancel(client: redis.Redis, request_id: str, reason: str, ttl_s: int) -> None:
    """Tell every router to stop `request_id`; a router that has not started it yet sees the
    mark when it tries to claim it."""
    async with client.pipeline(transaction=False) as pipe:
        pipe.set(_CANCELLED + request_id, b"1", ex=ttl_s)
        pipe.publish(names.CANCEL_CHANNEL, CancelRequest(request_id=request_id,
                                                        reason=reason).to_json())
        await pipe.execute()
