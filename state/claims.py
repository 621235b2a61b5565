"""Request claims and worker liveness in Redis: what makes at-least-once delivery execute a
request at most once.

A router claims a request id before calling a provider. A redelivered request (consumer
crash, rebalance) then finds the claim and is not executed again. If the claim's owner is
no longer alive, the request was interrupted mid-call: exactly one worker reports that to the
client instead of silently re-running a call the provider may already have billed.

A request answered over a reply channel carries its bill in its claim: the router's last
frame and the claim's change from `run:<worker>` to `ans:<worker>\n<usage events JSON>`
(`answered`) are one atomic Redis operation (`workers/router/publisher.py`). A worker killed
after its answer went out but before its usage events were durable thus leaves the bill
behind, and the worker that finds the claim orphaned produces those very events
(`workers/router/worker.py`; the ledger keeps one row per event id) instead of reporting
`worker_lost` for a request whose client has its answer.

Who uses them: `workers/router/worker.py` claims and finishes each request
(`workers/router/main.py` keeps the worker's liveness); the ingress marks a request whose
client left with `publish_cancel` (`ingress/pipeline.py`), and `workers/router/cancel.py`
stops its attempts.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import orjson
import redis.asyncio as redis

from state.runtime import outage
from topics import names
from topics.messages import CancelRequest, UsageEvent

_CLAIM = "sy:claim:"
_ALIVE = "sy:alive:"
_CANCELLED = "sy:cancelled:"

# One round trip, atomic: cancelled? claimed? by whom, and is that worker alive? A claim is
# `run:<worker>`, `ans:<worker>\n<bill>` (answered, usage not yet durable) or `done`. The
# liveness key is read by computed name, which is fine on a single Redis node (not Cluster).
_CLAIM_LUA = """
local cur = redis.call('GET', KEYS[1])
local bill = ''
if cur then
  local eol = string.find(cur, '\\n', 1, true)
  if eol then
    bill = string.sub(cur, eol + 1)
    cur = string.sub(cur, 1, eol - 1)
  end
end
-- A bill outweighs a cancel: the client had its answer before it left.
if bill == '' and redis.call('EXISTS', KEYS[2]) == 1 then return {'cancelled', '', ''} end
if not cur then
  redis.call('SET', KEYS[1], 'run:' .. ARGV[1], 'PX', ARGV[2])
  return {'claimed', '', ''}
end
if cur == 'done' then return {'done', '', ''} end
local owner = string.sub(cur, 5)
if owner == ARGV[1] or redis.call('EXISTS', ARGV[3] .. owner) == 1 then
  return {'running', owner, ''}
end
if bill ~= '' then
  -- The bill passes to the caller, who finishes the claim once it is durable: should the
  -- caller die too, the next worker finds the bill again.
  redis.call('SET', KEYS[1], 'ans:' .. ARGV[1] .. '\\n' .. bill, 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], 'done', 'PX', ARGV[2])
end
return {'orphaned', owner, bill}
"""


class ClaimResult(enum.Enum):
    CLAIMED = "claimed"  # ours to execute
    DONE = "done"  # already answered; skip silently
    RUNNING = "running"  # a live worker is executing it; it will answer
    # Its worker died: mid-call (we must report the interruption) or, if it left a bill,
    # after the answer went out (we must write the bill).
    ORPHANED = "orphaned"
    CANCELLED = "cancelled"  # the client went away before it started


@dataclass(frozen=True, slots=True)
class Claim:
    """What `Claims.claim` found."""

    result: ClaimResult
    owner: str = ""  # running, orphaned: the worker that claimed it
    bill: bytes = b""  # orphaned after its answer went out: that answer's usage events

    def events(self) -> list[UsageEvent]:
        """The usage events of the bill (none without one)."""
        if not self.bill:
            return []
        return [UsageEvent.model_validate(event) for event in orjson.loads(self.bill)]


class ClaimWrite(NamedTuple):
    """A claim's change from `expect` to `value`, made by whoever publishes the answer it
    goes with (in the same atomic operation); no change if the claim is no longer `expect`
    (finished meanwhile)."""

    key: str
    expect: bytes
    value: bytes
    ttl_ms: int


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

    async def claim(self, request_id: str) -> Claim:
        """Try to claim `request_id`; returns the outcome and, if relevant, the owner and the
        bill it left. An orphaned claim with a bill is now the caller's: `finish` it once the
        bill is durable. Raises `state_unavailable` (503) when Redis cannot be reached: without
        a claim, a request that another live worker runs could run twice, so none is taken
        blind."""
        try:
            status, owner, bill = await self._claim_script(
                keys=[_CLAIM + request_id, _CANCELLED + request_id],
                args=[self._worker_id, self._claim_ttl_ms, _ALIVE],
            )
        except Exception as exc:
            # Only an outage is a 503; a bad script or reply is a bug and stays one.
            if (down := outage(exc)) is None:
                raise
            raise down from exc
        return Claim(ClaimResult(_text(status)), _text(owner),
                     bill.encode() if isinstance(bill, str) else bill)

    def answered(self, request_id: str, events: Sequence[UsageEvent]) -> ClaimWrite:
        """Our running claim on `request_id` as answered, carrying the bill `events`: written
        with the answer's last frame, kept until `finish` once the events are durable."""
        bill = b"[" + b",".join(event.to_json() for event in events) + b"]"
        owner = self._worker_id.encode()
        return ClaimWrite(_CLAIM + request_id, b"run:" + owner, b"ans:" + owner + b"\n" + bill,
                          self._claim_ttl_ms)

    async def finish(self, request_id: str) -> None:
        """The request is over and its usage durable: a redelivery is skipped."""
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


async def cancelled_among(client: redis.Redis, request_ids: list[str]) -> list[str]:
    """Which of `request_ids` their clients have left (marked by `publish_cancel`): for a
    router that may have missed the cancel channel's message."""
    if not request_ids:
        return []
    marks = await client.mget([_CANCELLED + request_id for request_id in request_ids])
    return [request_id for request_id, mark in zip(request_ids, marks, strict=True)
            if mark is not None]
