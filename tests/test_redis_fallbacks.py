"""A router whose Redis stops answering after a request's claim still decides: on the bandit
posteriors and breaker states it last read (the prior and CLOSED for what it never read), and
drops the learning it cannot write. Failures are injected into the bandit's and breakers'
calls only (the session stack's Redis keeps running for everyone else)."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis

from state.bandit import CachedPosteriors, PosteriorStore
from state.breakers import BreakerConfig, Breakers, BreakerState
from state.degraded import Degraded
from state.routing_policy import PolicyCache
from topics.catalog import load_catalog
from topics.messages import ReplyTarget, RequestEnvelope
from topics.settings import Settings
from workers.router.decide import Decider, ModeDefaults
from workers.router.sampler import ThompsonSampler


async def _unreachable(*_args: Any, **_kwargs: Any) -> Any:
    raise redis.TimeoutError("injected: Redis does not answer")


def _cut(store: PosteriorStore, breakers: Breakers) -> dict[str, Any]:
    """Make every bandit and breaker script fail as a paused Redis would; returns what to
    put back."""
    saved = {"s_read": store._read, "s_update": store._update, "b_read": breakers._read,
             "b_record": breakers._record, "b_acquire": breakers._acquire}
    store._read = store._update = _unreachable
    breakers._read = breakers._record = breakers._acquire = _unreachable
    return saved


def _mend(store: PosteriorStore, breakers: Breakers, saved: dict[str, Any]) -> None:
    store._read, store._update = saved["s_read"], saved["s_update"]
    breakers._read, breakers._record = saved["b_read"], saved["b_record"]
    breakers._acquire = saved["b_acquire"]


def _env(category: str) -> RequestEnvelope:
    return RequestEnvelope(
        request_id=f"req_{uuid.uuid4().hex}", tenant_id=f"tenant-{uuid.uuid4().hex[:8]}",
        key_id="k", received_at_ms=0, deadline_ms=2**50, reply=ReplyTarget(channel="c"),
        body={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        category=category)


async def test_decides_on_last_seen_state_when_redis_stops_answering(
        r: redis.Redis, pg: asyncpg.Pool) -> None:
    fallbacks: list[str] = []
    degraded = Degraded(fallbacks.append)
    catalog = load_catalog(Settings().catalog_path)
    store = PosteriorStore(r, half_life_s=3600.0)
    posteriors = CachedPosteriors(store, ttl_s=0.05, degraded=degraded)
    breakers = Breakers(r, BreakerConfig(), cache_ttl_s=0.05, degraded=degraded)
    decider = Decider(catalog, PolicyCache(pg, ttl_s=60), store, posteriors,
                      ThompsonSampler(7), breakers, feedback_rate=0.1,
                      defaults=ModeDefaults(race_routes=2, hedge_routes=2, council_members=2,
                                            judge_model=None),
                      degraded=degraded)
    category = f"test-fallback-{uuid.uuid4().hex[:8]}"
    env = _env(category)
    routes = [m.id for m in (await decider.decide(env)).ranked]
    assert len(routes) >= 3
    best, shut, *others = routes
    # The bandit has learnt that `best` is far ahead; `shut`'s breaker is open.
    for route in (best, *others):
        for _ in range(30):
            await store.update(uuid.uuid4().hex, category, route,
                               1.0 if route == best else 0.0, success=True, latency_ms=10.0)
    await breakers.record(shut, False, open_now=True)
    await asyncio.sleep(0.06)
    first = await decider.decide(_env(category))  # reads both afresh
    assert first.ranked[0].id == best
    assert shut not in {m.id for m in first.ranked}
    await asyncio.sleep(0.06)  # both caches expired: the next decision must ask Redis

    saved = _cut(store, breakers)
    try:
        for _ in range(20):  # no error, and the same view as before the cut
            decision = await decider.decide(_env(category))
            assert decision.ranked[0].id == best
            assert shut not in {m.id for m in decision.ranked}
        assert degraded.down
        # A category never read ranks on the prior; every route is closed for it.
        fresh = await decider.decide(_env(f"test-fallback-{uuid.uuid4().hex[:8]}"))
        assert {m.id for m in fresh.ranked} == set(routes) - {shut}
        # An attempt's outcome: not written, not raised.
        model = decision.ranked[0]
        await decider.learn("e1", decision, model, success=True, latency_ms=5.0,
                            prompt_tokens=1, completion_tokens=1, cached_tokens=0)
        assert await breakers.record(best, False) is BreakerState.CLOSED
        assert await breakers.acquire_probe(best)
        assert not await breakers.acquire_probe(shut)
    finally:
        _mend(store, breakers, saved)
    assert {"bandit posteriors", "circuit breakers", "bandit updates"} <= set(fallbacks)

    # Redis answers again: the next reads (started in the background) clear the outage.
    await decider.decide(_env(category))
    await decider.drain()  # those reads, and nothing left running before r closes
    assert not degraded.down


async def test_non_outage_errors_still_raise(r: redis.Redis) -> None:
    breakers = Breakers(r, BreakerConfig(), cache_ttl_s=0.0)

    async def bug(*_args: Any, **_kwargs: Any) -> Any:
        raise redis.ResponseError("ERR a bug of ours")

    breakers._read = bug
    with pytest.raises(redis.ResponseError):
        await breakers.closed_or_probing(["some-route"])
