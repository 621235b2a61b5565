"""The Thompson-sampling bandit: the pure core (topics/bandit.py: reward, decay, draws) and the
Redis-backed posteriors (state/bandit.py), against the session stack's real Redis."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Sequence

import numpy as np
import orjson
import pytest
import redis.asyncio as redis
from pydantic import ValidationError

from compose.stack import LocalStack
from ingress.policy import admit
from state.bandit import CachedPosteriors, Posterior, PosteriorStore
from state.redis_client import make_redis
from topics.bandit import (
    MAX_FEEDBACK_WEIGHT,
    ObjectiveWeights,
    Outcome,
    decay,
    feedback_weight,
    outcome_weight,
    reward,
)
from topics.catalog import load_catalog
from topics.identity import Principal
from topics.messages import RoutingOptions
from topics.routing_policy import RoutingPolicy
from topics.settings import Settings
from workers.router.decide import _weights as decide_weights
from workers.router.sampler import ThompsonSampler

HL = 30.0


def _cat() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"  # a fresh category: tests never share arms


def _eid() -> str:
    return uuid.uuid4().hex


async def _hash(r: redis.Redis, category: str, route: str) -> dict[str, str]:
    raw = await r.hgetall(f"sy:post:{category}:{route}")
    return {_s(k): _s(v) for k, v in raw.items()}


def _s(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def _redis_ms(r: redis.Redis) -> int:
    sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


# -- reward ------------------------------------------------------------------------------------

def _outcome(rng: np.random.Generator) -> Outcome:
    cheapest = float(rng.uniform(0.0001, 0.01))
    return Outcome(success=True, latency_ms=float(rng.uniform(10, 20_000)),
                   slo_ms=float(rng.uniform(100, 5000)),
                   cost_usd=cheapest * float(rng.uniform(1, 30)), cheapest_cost_usd=cheapest,
                   quality=float(rng.uniform(0, 1)) if rng.random() < 0.8 else None)


def _weights(rng: np.random.Generator) -> ObjectiveWeights:
    cost, latency, quality = (float(x) for x in rng.uniform(0, 3, size=3))
    return ObjectiveWeights(cost=cost, latency=latency, quality=quality)


def test_reward_is_zero_on_failure_and_within_unit_interval() -> None:
    rng = np.random.default_rng(1)
    for _ in range(2000):
        o = _outcome(rng)
        w = _weights(rng)
        assert 0.0 <= reward(o, w) <= 1.0
        failed = Outcome(False, o.latency_ms, o.slo_ms, o.cost_usd, o.cheapest_cost_usd, 1.0)
        assert reward(failed, w) == 0.0


def test_cheaper_faster_better_never_lowers_reward() -> None:
    rng = np.random.default_rng(2)
    for _ in range(2000):
        o = _outcome(rng)
        w = _weights(rng)
        base = reward(o, w)
        shrink = float(rng.uniform(0, 1))
        faster = Outcome(True, o.latency_ms * shrink, o.slo_ms, o.cost_usd,
                         o.cheapest_cost_usd, o.quality)
        cheaper = Outcome(True, o.latency_ms, o.slo_ms,
                          max(o.cost_usd * shrink, o.cheapest_cost_usd), o.cheapest_cost_usd,
                          o.quality)
        assert reward(faster, w) >= base - 1e-12
        assert reward(cheaper, w) >= base - 1e-12
        if o.quality is not None:
            better = Outcome(True, o.latency_ms, o.slo_ms, o.cost_usd, o.cheapest_cost_usd,
                             o.quality + (1 - o.quality) * shrink)
            assert reward(better, w) >= base - 1e-12


def test_weights_shift_the_reward() -> None:
    # A cheap mediocre route and a dear excellent one, both within their SLO.
    cheap = Outcome(True, 500, 1000, cost_usd=0.001, cheapest_cost_usd=0.001, quality=0.5)
    dear = Outcome(True, 500, 1000, cost_usd=0.01, cheapest_cost_usd=0.001, quality=0.95)
    frugal = ObjectiveWeights(cost=3, latency=1, quality=0.2)
    picky = ObjectiveWeights(cost=0.2, latency=1, quality=3)
    assert reward(cheap, frugal) > reward(dear, frugal)
    assert reward(dear, picky) > reward(cheap, picky)
    # latency: 1 at the SLO, a half at twice the SLO, and it only counts with weight
    slow = Outcome(True, 2000, 1000, 0.001, 0.001, None)
    assert reward(slow, ObjectiveWeights(cost=0, latency=1, quality=1)) == pytest.approx(0.5)
    assert reward(slow, ObjectiveWeights(cost=1, latency=0, quality=1)) == 1.0


def test_outcome_and_feedback_weights_add_up_to_one_request() -> None:
    o = Outcome(True, 1500, 1000, 0.003, 0.001, None)
    failed = Outcome(False, 1500, 1000, 0.003, 0.001, None)
    for w in (ObjectiveWeights(), ObjectiveWeights(cost=2, latency=1, quality=1.5),
              ObjectiveWeights(cost=1, latency=3, quality=0.5),
              ObjectiveWeights(cost=0.5, latency=1, quality=2)):
        q = 0.8
        with_quality = reward(Outcome(True, 1500, 1000, 0.003, 0.001, q), w)
        for rate in (1.0, 0.5, 0.2):
            w_out, w_fb = outcome_weight(o, w, rate), feedback_weight(w, rate)
            # one request's evidence, in expectation over which answers get scored, is 1 ...
            assert w_out + rate * w_fb == pytest.approx(1.0)
            # ... and its expected contribution to alpha is the reward with quality known
            assert w_out * reward(o, w) + rate * w_fb * q == pytest.approx(with_quality)
            assert outcome_weight(failed, w, rate) == 1.0  # no answer: quality known, 0
        assert outcome_weight(o, w, 0.0) == 1.0  # no feedback collected: quality drops out
        assert feedback_weight(w, 0.0) == 0.0
    assert feedback_weight(ObjectiveWeights(cost=1, latency=1, quality=1), 0.01) \
        == MAX_FEEDBACK_WEIGHT


# -- objective weights: one type for requests, policies and the router -------------------------

def test_objective_weights_are_one_type() -> None:
    assert RoutingOptions.model_fields["weights"].annotation is ObjectiveWeights
    assert RoutingPolicy.model_fields["weights"].annotation is ObjectiveWeights
    assert type(RoutingPolicy.model_validate({"weights": {"cost": 2}}).weights) \
        is ObjectiveWeights
    frozen = ObjectiveWeights()
    with pytest.raises(ValidationError):
        frozen.cost = 2.0  # type: ignore[misc]


def test_a_request_accepts_the_weights_producers_send() -> None:
    # All zeros too (success alone then counts), unlike a tenant's policy; a number as text,
    # as it always has. Unknown fields and negative weights are refused.
    for weights, expected in (
            ({"cost": 0, "latency": 0, "quality": 0}, ObjectiveWeights(cost=0, latency=0,
                                                                       quality=0)),
            ({"cost": 2, "quality": "0.5"}, ObjectiveWeights(cost=2, quality=0.5)),
            ({}, ObjectiveWeights())):
        raw = orjson.dumps({"weights": weights})
        assert RoutingOptions.model_validate_json(raw).weights == expected
    assert reward(Outcome(True, 5000, 1000, 0.01, 0.001, 0.1),
                  ObjectiveWeights(cost=0, latency=0, quality=0)) == 1.0
    for bad in ({"speed": 1}, {"cost": -1}):
        with pytest.raises(ValidationError):
            RoutingOptions.model_validate({"weights": bad})


def test_a_policy_refuses_all_zero_weights_and_numbers_as_text() -> None:
    with pytest.raises(ValidationError) as zeros:
        RoutingPolicy.model_validate({"weights": {"cost": 0, "latency": 0, "quality": 0}})
    [error] = zeros.value.errors()
    assert (error["loc"], error["msg"]) == (
        ("weights",), "Value error, at least one of cost, latency and quality must be above 0")
    with pytest.raises(ValidationError) as text:
        RoutingPolicy.model_validate({"weights": {"cost": "1"}})
    assert text.value.errors()[0]["loc"] == ("weights", "cost")
    with pytest.raises(ValidationError):
        RoutingPolicy(weights=ObjectiveWeights(cost=0, latency=0, quality=0))
    assert RoutingPolicy(weights=ObjectiveWeights(cost=0, latency=1, quality=0)).weights.latency \
        == 1.0


def test_optimize_for_presets_are_objective_weights() -> None:
    catalog = load_catalog(Settings().catalog_path)
    owner = Principal(key_id="k", tenant_id="t")
    expected = {"balanced": ObjectiveWeights(cost=1, latency=1, quality=1),
                "cost": ObjectiveWeights(cost=1, latency=0.2, quality=0.2),
                "latency": ObjectiveWeights(cost=0.2, latency=1, quality=0.2),
                "quality": ObjectiveWeights(cost=0.2, latency=0.2, quality=1)}
    for name, weights in expected.items():
        body = {"model": "auto", "messages": [], "policy": {"optimize_for": name}}
        routing = admit(body, catalog, "chat", owner, None).routing
        # as the envelope's JSON carries them, and as the router reads them back
        assert orjson.loads(orjson.dumps(routing))["weights"] == weights.model_dump()
        assert RoutingOptions.model_validate(routing).weights == weights


def test_a_request_sets_its_own_weights_unless_it_left_the_default() -> None:
    tenant = ObjectiveWeights(cost=3, latency=1, quality=0)
    own = ObjectiveWeights(cost=1, latency=0.2, quality=0.2)
    assert decide_weights(own, tenant) is own
    assert decide_weights(ObjectiveWeights(), tenant) is tenant


# -- decay -------------------------------------------------------------------------------------

def test_decay_halves_the_excess_over_the_prior_each_half_life() -> None:
    assert decay(21.0, 5.0, 1.0, 1.0, HL, HL) == pytest.approx((11.0, 3.0))
    assert decay(21.0, 5.0, 1.0, 1.0, 2 * HL, HL) == pytest.approx((6.0, 2.0))
    assert decay(21.0, 5.0, 1.0, 1.0, 0.0, HL) == (21.0, 5.0)
    assert decay(21.0, 5.0, 1.0, 1.0, -3.0, HL) == (21.0, 5.0)  # clock went backwards
    assert decay(21.0, 5.0, 1.0, 1.0, 1e6, math.inf) == (21.0, 5.0)


async def test_lua_update_decays_exactly_like_the_core(r: redis.Redis) -> None:
    store = PosteriorStore(r, prior=(1.5, 2.5), half_life_s=HL)
    cat, route = _cat(), "claude-haiku-4-5"
    before = await _redis_ms(r) - 45_678  # as if last updated ~45.7 s ago
    await r.hset(f"sy:post:{cat}:{route}", mapping={"alpha": "30.5", "beta": "7.25",
                                                    "updated_ms": str(before)})
    assert await store.update(_eid(), cat, route, 0.3, success=True, latency_ms=812.5)
    stored = await _hash(r, cat, route)
    elapsed = (int(stored["updated_ms"]) - before) / 1000
    assert elapsed >= 45.678
    a, b = decay(30.5, 7.25, 1.5, 2.5, elapsed, HL)
    assert float(stored["alpha"]) == pytest.approx(a + 0.3, abs=1e-9)
    assert float(stored["beta"]) == pytest.approx(b + 0.7, abs=1e-9)


async def test_lua_read_decays_exactly_like_the_core(r: redis.Redis) -> None:
    store = PosteriorStore(r, prior=(1.0, 1.0), half_life_s=HL)
    cat = _cat()
    before = await _redis_ms(r) - 3 * 60_000
    await r.hset(f"sy:post:{cat}:a", mapping={"alpha": "120.125", "beta": "3.5",
                                              "updated_ms": str(before)})
    now, posteriors = await store.read_at(cat, ["a", "never-used"])
    a, b = decay(120.125, 3.5, 1.0, 1.0, (now - before) / 1000, HL)
    assert posteriors["a"].alpha == pytest.approx(a, abs=1e-9)
    assert posteriors["a"].beta == pytest.approx(b, abs=1e-9)
    assert posteriors["never-used"] == Posterior(1.0, 1.0)  # a missing arm is the prior
    # reading does not write: the stored posterior is unchanged
    assert (await _hash(r, cat, "a"))["alpha"] == "120.125"


async def test_redelivered_event_changes_nothing(r: redis.Redis) -> None:
    store = PosteriorStore(r, prior=(1.0, 1.0), half_life_s=HL)
    cat, route, event = _cat(), "gpt-4o-mini", _eid()
    assert await store.update(event, cat, route, 0.75, success=True, latency_ms=400.0)
    first = await _hash(r, cat, route)
    window = await r.lrange(f"sy:post-lat:{cat}:{route}", 0, -1)
    await asyncio.sleep(0.01)  # a redelivery comes later: a second decay would show
    assert not await store.update(event, cat, route, 0.75, success=True, latency_ms=400.0)
    assert not await store.update(event, cat, route, 0.0, success=False, latency_ms=None)
    assert await _hash(r, cat, route) == first
    assert await r.lrange(f"sy:post-lat:{cat}:{route}", 0, -1) == window
    # feedback is idempotent on its own event id, separately from the outcome's
    assert await store.feedback(event, cat, route, 0.9, weight=0.5)
    after = await _hash(r, cat, route)
    assert not await store.feedback(event, cat, route, 0.9, weight=0.5)
    assert await _hash(r, cat, route) == after


async def test_feedback_is_a_partial_update(stack: LocalStack, r: redis.Redis) -> None:
    store = PosteriorStore(r, prior=(1.0, 1.0), half_life_s=math.inf)
    cat = _cat()
    assert await store.feedback(_eid(), cat, "m", 0.8, weight=0.5)
    post = (await store.read(cat, ["m"]))["m"]
    assert post.alpha == pytest.approx(1.4)
    assert post.beta == pytest.approx(1.1)
    with pytest.raises(ValueError, match="quality"):
        await store.feedback(_eid(), cat, "m", 1.5, weight=0.5)
    # an outcome with a weight below 1: a success whose quality score is still to come
    assert await store.update(_eid(), cat, "m", 0.5, success=True, latency_ms=1.0, weight=0.4)
    post = (await store.read(cat, ["m"]))["m"]
    assert post.alpha == pytest.approx(1.6)
    assert post.beta == pytest.approx(1.3)


async def test_concurrent_updates_are_all_counted(stack: LocalStack) -> None:
    clients = [make_redis(stack.settings.redis) for _ in range(2)]
    stores = [PosteriorStore(c, prior=(1.0, 1.0), half_life_s=math.inf) for c in clients]
    cat, route = _cat(), "gemini-2.5-flash"
    rewards = [((i * 37) % 100) / 100 for i in range(400)]
    try:
        results = await asyncio.gather(*(
            stores[i % 2].update(_eid(), cat, route, rw, success=rw > 0.1, latency_ms=100.0)
            for i, rw in enumerate(rewards)))
        assert all(results)
        stored = await _hash(clients[0], cat, route)
        assert float(stored["alpha"]) == pytest.approx(1 + sum(rewards), abs=1e-9)
        assert float(stored["beta"]) == pytest.approx(1 + sum(1 - x for x in rewards), abs=1e-9)
        assert int(stored["successes"]) == sum(x > 0.1 for x in rewards)
        assert int(stored["failures"]) == sum(x <= 0.1 for x in rewards)
    finally:
        for c in clients:
            await c.aclose()


async def test_two_stores_on_two_connections_share_posteriors(stack: LocalStack) -> None:
    a_client, b_client = make_redis(stack.settings.redis), make_redis(stack.settings.redis)
    try:
        a = PosteriorStore(a_client, prior=(1.0, 1.0), half_life_s=HL)
        b = PosteriorStore(b_client, prior=(1.0, 1.0), half_life_s=HL)
        cat, event = _cat(), _eid()
        assert await a.update(event, cat, "x", 1.0, success=True, latency_ms=50.0)
        assert not await b.update(event, cat, "x", 1.0, success=True, latency_ms=50.0)
        assert await b.update(_eid(), cat, "y", 0.0, success=False, latency_ms=None)
        seen_a, seen_b = await a.read(cat, ["x", "y"]), await b.read(cat, ["x", "y"])
        for route in ("x", "y"):
            assert seen_a[route] == pytest.approx(seen_b[route], abs=1e-3)  # ms apart
        assert seen_a["x"].alpha == pytest.approx(2.0, abs=1e-3)
        assert seen_b["y"].beta == pytest.approx(2.0, abs=1e-3)
    finally:
        await a_client.aclose()
        await b_client.aclose()


class _CountingStore(PosteriorStore):
    reads = 0
    broken = False

    async def read(self, category: str, routes: Sequence[str]) -> dict[str, Posterior]:
        self.reads += 1
        if self.broken:
            raise redis.ConnectionError("down")
        return await super().read(category, routes)


async def test_cache_serves_within_ttl_and_refreshes_after(r: redis.Redis) -> None:
    # The cache's own clock, moved by the test: what is checked is ages against the TTL, and a
    # loaded box's scheduling must not age anything behind the test's back.
    now = [0.0]
    store = _CountingStore(r, prior=(1.0, 1.0), half_life_s=math.inf)
    cache = CachedPosteriors(store, ttl_s=0.3, refresh_after_s=0.15, clock=lambda: now[0])
    cat, routes = _cat(), ["a", "b", "c"]
    # concurrent misses share one read
    first = await asyncio.gather(*(cache.get(cat, routes) for _ in range(20)))
    assert store.reads == 1
    assert first[0]["a"] == Posterior(1.0, 1.0)
    await store.update(_eid(), cat, "a", 1.0, success=True, latency_ms=10.0)
    assert (await cache.get(cat, list(reversed(routes))))["a"] == Posterior(1.0, 1.0)
    assert store.reads == 1  # same route set, any order: still cached
    # past refresh_after: still the cached value, and a refresh starts in the background
    now[0] = 0.18
    assert (await cache.get(cat, routes))["a"] == Posterior(1.0, 1.0)
    await cache.drain()
    assert (await cache.get(cat, routes))["a"] == Posterior(2.0, 1.0)
    assert store.reads == 2
    # past the TTL: the caller waits for a fresh read
    await store.update(_eid(), cat, "a", 1.0, success=True, latency_ms=10.0)
    now[0] = 0.18 + 0.35
    assert (await cache.get(cat, routes))["a"] == Posterior(3.0, 1.0)
    assert store.reads == 3
    # Redis down: the last value is served stale rather than failing the decision, and a key
    # never read gets the prior
    now[0] += 0.35
    store.broken = True
    assert (await cache.get(cat, routes))["a"] == Posterior(3.0, 1.0)
    assert (await cache.get(_cat(), routes))["a"] == Posterior(1.0, 1.0)
    await cache.drain()  # the background read that started has failed too
    reads = store.reads
    # ...at once from then on (no wait for Redis), retrying in the background until it answers
    assert (await cache.get(cat, routes))["a"] == Posterior(3.0, 1.0)
    await cache.drain()
    assert store.reads == reads + 1
    store.broken = False
    assert (await cache.get(cat, routes))["a"] == Posterior(3.0, 1.0)
    await cache.drain()
    assert store.reads == reads + 2
    assert not cache._degraded.down


async def test_stats(r: redis.Redis) -> None:
    store = PosteriorStore(r, prior=(1.0, 1.0), half_life_s=HL)
    cat = _cat()
    for i in range(100):
        await store.update(_eid(), cat, "m", 0.9, success=True, latency_ms=float(i + 1))
    for _ in range(25):
        await store.update(_eid(), cat, "m", 0.0, success=False, latency_ms=9999.0)
        await store.note_selection(cat, "m")
    await store.feedback(_eid(), cat, "m", 0.6, weight=1.0)
    stats = await store.stats([cat], ["m", "unused"])
    m, unused = stats
    assert (m.category, m.route, m.successes, m.failures, m.selections) == (cat, "m", 100, 25,
                                                                            25)
    assert m.error_rate == pytest.approx(0.2)
    assert (m.latency_p50_ms, m.latency_p95_ms) == (50.0, 95.0)  # failures not in the window
    assert m.mean_quality == pytest.approx(0.6)
    assert m.mean == pytest.approx(m.alpha / (m.alpha + m.beta))
    assert (unused.alpha, unused.beta, unused.error_rate, unused.latency_p95_ms) == (
        1.0, 1.0, None, None)


# -- sampler -----------------------------------------------------------------------------------

def test_sampler_is_reproducible_for_a_seed() -> None:
    arms = [(3.0, 2.0), (2.0, 2.0), (5.0, 4.0), (1.0, 1.0)]
    a, b = ThompsonSampler(7), ThompsonSampler(7)
    assert [a.choose(arms) for _ in range(50)] == [b.choose(arms) for _ in range(50)]
    ranks = [a.rank(arms) for _ in range(50)]
    assert ranks == [b.rank(arms) for _ in range(50)]
    assert all(sorted(order) == [0, 1, 2, 3] for order in ranks)
    with pytest.raises(ValueError, match="no arms"):
        a.choose([])


def test_evidence_at_draw_time_equals_bigger_updates() -> None:
    prior, k = (1.0, 2.0), 16.0
    stored = [(1.0 + 3.5, 2.0 + 1.25), (1.0 + 0.5, 2.0 + 2.0), prior]
    scaled = [(prior[0] + k * (al - prior[0]), prior[1] + k * (be - prior[1]))
              for al, be in stored]
    sharp = ThompsonSampler(3, prior=prior, evidence=k)
    literal = ThompsonSampler(3, prior=prior, evidence=1.0)
    assert np.allclose(sharp.draw(stored), literal.draw(scaled))


@pytest.mark.parametrize("evidence", [1.0, 128.0])
def test_sampler_picks_the_clearly_better_arm(evidence: float) -> None:
    sampler = ThompsonSampler(11, prior=(1.0, 1.0), evidence=evidence)
    arms = [(25.0, 25.0)] * 7
    arms.insert(3, (40.0, 10.0))  # mean 0.8 against seven arms at 0.5
    picks = [sampler.choose(arms) for _ in range(2000)]
    assert picks.count(3) >= 0.95 * len(picks)
    assert sum(sampler.rank(arms)[0] == 3 for _ in range(500)) >= 475
