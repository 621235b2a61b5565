"""Request claims on the session stack's real Redis (`state/claims.py`): what the claim
script answers a redelivered request, a claim that carries its answer's bill (written with
the answer's last frame by `workers/router/publisher.py`, in one atomic script), and what a
worker that finds it after its owner died gets."""

from __future__ import annotations

import asyncio
import time
import uuid
from decimal import Decimal

import redis.asyncio as redis

from state.claims import Claim, ClaimResult, Claims, cancelled_among, publish_cancel
from tests.test_reply_publisher import Channel
from topics.messages import UsageEvent, encode_frame
from workers.router.publisher import ReplyPublisher


def _claims(r: redis.Redis, worker: str) -> Claims:
    return Claims(r, worker_id=worker, claim_ttl_s=60, heartbeat_ttl_ms=60_000)


def _worker() -> str:
    return f"router-test-{uuid.uuid4().hex[:8]}"


def _request() -> str:
    return f"req_{uuid.uuid4().hex}"


def _event(request_id: str, attempt: int, status: str = "ok") -> UsageEvent:
    now = int(time.time() * 1000)
    return UsageEvent(event_id=str(uuid.uuid4()), request_id=request_id, tenant_id="t-claims",
                      key_id="k-claims", provider="openai", model="gpt-4o-mini",
                      status=status, error_code=None if status == "ok" else "upstream_error",
                      prompt_tokens=12, completion_tokens=34, cost_usd=Decimal("0.000123"),
                      latency_ms=56.5, attempt=attempt, started_at_ms=now - 57,
                      finished_at_ms=now)


async def _answer(r: redis.Redis, claims: Claims, request_id: str,
                  events: list[UsageEvent]) -> None:
    """What a router does with a request's last frame: publish it with its bill."""
    async with Channel(r) as channel, ReplyPublisher(r) as publisher:
        publisher.publish(channel.name, encode_frame(request_id, 0, "done", b"{}"),
                          write=claims.answered(request_id, events))
        assert [f.kind for f in await channel.message()] == ["done"]


async def test_a_request_is_claimed_once_and_a_live_owner_keeps_it(r: redis.Redis) -> None:
    first, second = _claims(r, _worker()), _claims(r, _worker())
    await first.heartbeat()
    request_id = _request()

    assert await first.claim(request_id) == Claim(ClaimResult.CLAIMED)
    assert await second.claim(request_id) == Claim(ClaimResult.RUNNING, first.worker_id)
    assert await first.claim(request_id) == Claim(ClaimResult.RUNNING, first.worker_id)
    await first.finish(request_id)
    assert await second.claim(request_id) == Claim(ClaimResult.DONE)


async def test_a_dead_owner_without_a_bill_is_reported_once(r: redis.Redis) -> None:
    dead, successor, third = _claims(r, _worker()), _claims(r, _worker()), _claims(r, _worker())
    request_id = _request()
    await dead.claim(request_id)  # and it never heartbeats: it is dead

    found = await successor.claim(request_id)
    assert found == Claim(ClaimResult.ORPHANED, dead.worker_id)
    assert found.events() == []
    assert await third.claim(request_id) == Claim(ClaimResult.DONE)  # reported once


async def test_an_answered_claim_carries_its_bill_to_the_worker_that_finds_its_owner_dead(
        r: redis.Redis) -> None:
    owner, successor, third = _claims(r, _worker()), _claims(r, _worker()), _claims(r, _worker())
    await owner.heartbeat()
    await successor.heartbeat()
    request_id = _request()
    events = [_event(request_id, 1, "error"), _event(request_id, 2)]
    await owner.claim(request_id)
    await _answer(r, owner, request_id, events)

    # Alive, it writes the bill itself.
    assert await successor.claim(request_id) == Claim(ClaimResult.RUNNING, owner.worker_id)
    await owner.retire()  # dead
    found = await successor.claim(request_id)
    assert (found.result, found.owner) == (ClaimResult.ORPHANED, owner.worker_id)
    assert found.events() == events  # the very events: same ids, same amounts

    # The bill is the successor's now: until it finishes, nobody else takes it, and should
    # it die too, the next worker finds the bill again.
    assert await third.claim(request_id) == Claim(ClaimResult.RUNNING, successor.worker_id)
    await successor.retire()
    again = await third.claim(request_id)
    assert (again.result, again.events()) == (ClaimResult.ORPHANED, events)
    await third.finish(request_id)
    assert await successor.claim(request_id) == Claim(ClaimResult.DONE)


async def test_a_bill_outweighs_the_clients_cancel(r: redis.Redis) -> None:
    owner, successor = _claims(r, _worker()), _claims(r, _worker())
    answered, interrupted, unstarted = _request(), _request(), _request()
    await owner.claim(answered)
    await owner.claim(interrupted)
    await _answer(r, owner, answered, [_event(answered, 1)])
    for request_id in (answered, interrupted, unstarted):
        await publish_cancel(r, request_id, "client_disconnected", ttl_s=60)

    # The client left after its answer: the answer is still billed.
    assert (await successor.claim(answered)).result is ClaimResult.ORPHANED
    # It left mid-call or before the start: nobody is told, nothing to bill.
    assert await successor.claim(interrupted) == Claim(ClaimResult.CANCELLED)
    assert await successor.claim(unstarted) == Claim(ClaimResult.CANCELLED)
    assert sorted(await cancelled_among(r, [answered, _request(), unstarted])) \
        == sorted([answered, unstarted])


async def test_a_late_flush_does_not_turn_a_finished_claim_back_into_a_bill(
        r: redis.Redis) -> None:
    # A flush retried after Redis came back, once the request's usage was written.
    owner, successor = _claims(r, _worker()), _claims(r, _worker())
    request_id = _request()
    await owner.claim(request_id)
    await owner.finish(request_id)
    await _answer(r, owner, request_id, [_event(request_id, 1)])
    assert await r.get(f"sy:claim:{request_id}") == b"done"
    await owner.retire()
    assert await successor.claim(request_id) == Claim(ClaimResult.DONE)


async def test_the_bill_is_in_redis_when_the_answer_arrives_even_after_a_failed_flush(
        r: redis.Redis) -> None:
    owner = _claims(r, _worker())
    request_id = _request()
    await owner.claim(request_id)
    events = [_event(request_id, 1)]
    real_evalsha = r.evalsha
    refusals = 2

    async def flaky_evalsha(*args: object, **kwargs: object) -> object:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise redis.ConnectionError("Connection refused (injected)")
        return await real_evalsha(*args, **kwargs)  # type: ignore[arg-type]

    r.evalsha = flaky_evalsha  # type: ignore[method-assign]
    async with Channel(r) as channel, ReplyPublisher(r) as publisher:
        publisher.publish(channel.name, encode_frame(request_id, 0, "meta", b"{}"))
        billed = publisher.publish(channel.name, encode_frame(request_id, 1, "done", b"{}"),
                                   write=owner.answered(request_id, events))
        assert billed is not None
        await asyncio.sleep(0.01)  # the first flush fails
        assert not billed.done()  # the router does not write the usage to Kafka yet
        other = _request()
        publisher.publish(channel.name, encode_frame(other, 0, "chunk", b"{}"))
        received: list[tuple[str, int]] = []
        while len(received) < 3:
            received += [(f.request_id, f.seq) for f in await channel.message()]
            # Whenever the answer has arrived, its bill is in the claim.
            if (request_id, 1) in received:
                claim = await r.get(f"sy:claim:{request_id}")
                assert isinstance(claim, bytes)
                assert claim.startswith(f"ans:{owner.worker_id}\n".encode())
    assert received == [(request_id, 0), (request_id, 1), (other, 0)]
    assert refusals == 0
    assert billed.done()


async def test_a_bill_whose_flush_is_given_up_on_no_longer_holds_back_the_usage(
        r: redis.Redis) -> None:
    # Redis gone for good while the router stops: the frames are dropped, and the usage is
    # written to Kafka all the same (the provider served those attempts).
    owner = _claims(r, _worker())
    request_id = _request()

    async def refused(*args: object, **kwargs: object) -> object:
        raise redis.ConnectionError("Connection refused (injected)")

    r.evalsha = refused  # type: ignore[method-assign]
    async with ReplyPublisher(r) as publisher:
        billed = publisher.publish("nobody-listens", encode_frame(request_id, 0, "done", b"{}"),
                                   write=owner.answered(request_id, [_event(request_id, 1)]))
        assert billed is not None
    assert billed.done()
