"""Circuit breakers shared through the session stack's real Redis. Two `Breakers` on two
clients stand for two router workers; every test uses fresh route names."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import pytest
import redis.asyncio as redis

from compose.stack import LocalStack
from state.breakers import BreakerConfig, Breakers, BreakerState
from state.redis_client import make_redis
from tests.conftest import eventually

# Thresholds far apart so each test exercises one rule. A cool-down no loaded CI box can
# outlast mid-test where a test says "still cooling down", and a short one (QUICK) where a
# test waits it out: that one still holds for a second, so the assertions made right after a
# route (re)opens do not race it.
CFG = BreakerConfig(window_s=10.0, min_calls=100, failure_rate=0.5, consecutive_failures=3,
                    cooldown_s=60.0, probes=1, probe_timeout_s=30.0)
QUICK = dataclasses.replace(CFG, cooldown_s=1.0)


@pytest.fixture
async def r2(stack: LocalStack) -> AsyncIterator[redis.Redis]:
    """Another worker's connection pool."""
    client = make_redis(stack.settings.redis)
    yield client
    await client.aclose()


def _route() -> str:
    return f"test-brk-{uuid.uuid4().hex[:10]}"


async def _open(breakers: Breakers, route: str) -> None:
    for _ in range(breakers.config.consecutive_failures):
        await breakers.record(route, success=False)
    assert (await breakers.views([route]))[0].state is BreakerState.OPEN


async def _past_cooldown(breakers: Breakers, route: str) -> None:
    async def candidate() -> bool:
        return route in await breakers.closed_or_probing([route])
    await eventually(candidate, timeout_s=breakers.config.cooldown_s + 10.0, every_s=0.01)


# -- opening -----------------------------------------------------------------------------------

async def test_opens_after_consecutive_failures(r: redis.Redis) -> None:
    b, route = Breakers(r, CFG), _route()
    assert await b.record(route, success=False) is BreakerState.CLOSED
    assert await b.record(route, success=False) is BreakerState.CLOSED
    assert await b.record(route, success=False) is BreakerState.OPEN
    [view] = await b.views([route])
    assert view.state is BreakerState.OPEN
    assert view.consecutive_failures == 3
    assert view.opened_at_ms is not None
    assert view.retry_at_ms is not None
    assert view.retry_at_ms - view.opened_at_ms == CFG.cooldown_s * 1000


async def test_successes_reset_the_consecutive_count(r: redis.Redis) -> None:
    b, route = Breakers(r, CFG), _route()
    for success in (False, False, True, False, False):
        assert await b.record(route, success) is BreakerState.CLOSED
    [view] = await b.views([route])
    assert view.consecutive_failures == 2
    assert (view.calls_in_window, view.failures_in_window) == (5, 4)


async def test_failure_rate_opens_only_past_min_calls(r: redis.Redis) -> None:
    cfg = BreakerConfig(window_s=10.0, min_calls=10, failure_rate=0.5, consecutive_failures=100,
                        cooldown_s=0.2)
    b, route = Breakers(r, cfg), _route()
    # F S F S ... : at or above 50 % failures from the first call, but fewer than min_calls
    for i in range(9):
        assert await b.record(route, success=i % 2 == 1) is BreakerState.CLOSED
    assert await b.record(route, success=True) is BreakerState.OPEN  # 5 of 10

    below = _route()
    for i in range(20):
        assert await b.record(below, success=i % 5 < 3) is BreakerState.CLOSED  # S S S F F: 40 %


async def test_outcomes_leave_the_window(r: redis.Redis) -> None:
    cfg = BreakerConfig(window_s=0.2, min_calls=100, consecutive_failures=100)
    b, route = Breakers(r, cfg), _route()
    for success in (False, False, True):
        await b.record(route, success)
    [view] = await b.views([route])
    assert (view.calls_in_window, view.failures_in_window) == (3, 2)

    async def emptied() -> bool:
        [v] = await b.views([route])
        return v.calls_in_window == 0 and v.failures_in_window == 0
    await eventually(emptied, timeout_s=10.0, every_s=0.02)
    # the consecutive count is not a windowed figure
    assert (await b.views([route]))[0].consecutive_failures == 0


# -- shared state and the cache -----------------------------------------------------------------

async def test_open_route_is_excluded_in_every_worker(r: redis.Redis, r2: redis.Redis) -> None:
    a, b = Breakers(r, CFG), Breakers(r2, CFG)
    route, healthy = _route(), _route()
    assert await a.closed_or_probing([route, healthy]) == {route, healthy}
    await _open(a, route)
    assert await a.closed_or_probing([route, healthy]) == {healthy}
    assert await b.closed_or_probing([route, healthy]) == {healthy}
    assert not await b.acquire_probe(route)  # still cooling down
    assert await b.acquire_probe(healthy)  # closed: no slot needed


async def test_own_record_invalidates_the_cache(r: redis.Redis, r2: redis.Redis) -> None:
    a = Breakers(r, CFG, cache_ttl_s=60.0)
    b = Breakers(r2, CFG, cache_ttl_s=60.0)
    route = _route()
    assert await a.closed_or_probing([route]) == {route}
    assert await b.closed_or_probing([route]) == {route}
    await _open(a, route)
    assert await a.closed_or_probing([route]) == set()  # at once: its own change
    assert await b.closed_or_probing([route]) == {route}  # another worker's: within the TTL


async def test_cache_bounds_staleness(r: redis.Redis, r2: redis.Redis) -> None:
    ttl = 0.05
    a, b = Breakers(r, CFG, cache_ttl_s=ttl), Breakers(r2, CFG, cache_ttl_s=ttl)
    route = _route()
    assert await a.closed_or_probing([route]) == {route}
    await _open(b, route)

    async def excluded() -> bool:
        return route not in await a.closed_or_probing([route])
    await eventually(excluded, timeout_s=ttl + 10.0, every_s=0.005)
    await a.drain()  # a refresh may still be in flight: not after the client closes


async def test_concurrent_misses_share_one_read(r: redis.Redis, stack: LocalStack) -> None:
    # A cool-down that cannot pass mid-test: the opened route must stay out of the burst.
    b = Breakers(r, CFG, cache_ttl_s=60.0)
    route, other = _route(), _route()
    await b.views([_route()])  # load the read script: a NOSCRIPT retry would count twice

    expected = {route, other}

    async def burst() -> None:
        results = await asyncio.gather(
            *(b.closed_or_probing([route, other]) for _ in range(20)))
        assert all(result == expected for result in results)

    first = await _scripts_run(stack, r, burst, (route, other))
    [read] = first  # one read for both routes
    assert route in read
    assert other in read
    assert await _scripts_run(stack, r, burst, (route, other)) == []  # cached

    # An outcome that leaves the route closed is itself a fresh reading: still no read.
    await b.record(route, success=True)
    assert await _scripts_run(stack, r, burst, (route, other)) == []
    # One that opens it invalidates it: only that route is read again.
    for _ in range(b.config.consecutive_failures):
        await b.record(route, success=False)
    expected = {other}
    again = await _scripts_run(stack, r, burst, (route, other))
    [read] = again
    assert route in read
    assert other not in read


# -- half-open -----------------------------------------------------------------------------------

async def test_exactly_probes_callers_get_a_slot(r: redis.Redis, r2: redis.Redis) -> None:
    cfg = dataclasses.replace(QUICK, probes=2)
    a, b = Breakers(r, cfg), Breakers(r2, cfg)
    route = _route()
    await _open(a, route)
    await _past_cooldown(a, route)
    assert route in await b.closed_or_probing([route])
    # reporting a candidate takes no slot and moves nothing
    assert (await a.views([route]))[0].state is BreakerState.OPEN

    granted = await asyncio.gather(*(w.acquire_probe(route) for w in (a, b) * 10))
    assert sum(granted) == 2
    [view] = await a.views([route])
    assert view.state is BreakerState.HALF_OPEN
    assert route not in await Breakers(r, cfg, cache_ttl_s=0).closed_or_probing([route])


async def test_probe_success_closes_and_resets_the_window(r: redis.Redis) -> None:
    b, route = Breakers(r, QUICK), _route()
    await _open(b, route)
    await _past_cooldown(b, route)
    assert await b.acquire_probe(route)
    assert await b.record(route, success=True) is BreakerState.CLOSED
    [view] = await b.views([route])
    assert view.state is BreakerState.CLOSED
    assert (view.calls_in_window, view.failures_in_window, view.consecutive_failures) == (0, 0, 0)
    assert view.retry_at_ms is None
    assert view.opened_at_ms is not None
    assert await b.closed_or_probing([route]) == {route}


async def test_probe_failure_reopens_with_a_new_cooldown(r: redis.Redis) -> None:
    b, route = Breakers(r, QUICK), _route()
    await _open(b, route)
    [before] = await b.views([route])
    await _past_cooldown(b, route)
    assert await b.acquire_probe(route)
    assert await b.record(route, success=False) is BreakerState.OPEN
    [after] = await b.views([route])
    assert after.opened_at_ms is not None
    assert before.opened_at_ms is not None
    assert after.retry_at_ms is not None
    assert before.retry_at_ms is not None
    assert after.opened_at_ms > before.opened_at_ms
    assert after.retry_at_ms == after.opened_at_ms + QUICK.cooldown_s * 1000 > \
        before.retry_at_ms
    assert not await b.acquire_probe(route)
    assert route not in await b.closed_or_probing([route])


async def test_unreported_probe_slot_is_freed(r: redis.Redis, r2: redis.Redis) -> None:
    cfg = dataclasses.replace(QUICK, probe_timeout_s=1.0)
    a, b = Breakers(r, cfg), Breakers(r2, cfg)
    route = _route()
    await _open(a, route)
    await _past_cooldown(a, route)
    assert await a.acquire_probe(route)
    assert not await b.acquire_probe(route)

    async def b_gets_slot() -> bool:
        return await b.acquire_probe(route)
    await eventually(b_gets_slot, timeout_s=cfg.probe_timeout_s + 10.0, every_s=0.02)

    # the timed-out probe's late answer is no longer the probe's: it decides nothing
    assert await a.record(route, success=True) is BreakerState.HALF_OPEN
    assert await b.record(route, success=True) is BreakerState.CLOSED


async def test_straggler_outcomes_while_open_move_nothing(r: redis.Redis) -> None:
    b, route = Breakers(r, CFG), _route()
    await _open(b, route)
    [before] = await b.views([route])
    assert await b.record(route, success=True) is BreakerState.OPEN
    assert await b.record(route, success=False) is BreakerState.OPEN
    [after] = await b.views([route])
    assert after.retry_at_ms == before.retry_at_ms
    assert after.calls_in_window == before.calls_in_window + 2


# -- views and housekeeping ----------------------------------------------------------------------

async def test_views_of_unknown_routes(r: redis.Redis) -> None:
    b = Breakers(r, CFG)
    routes = [_route(), _route()]
    views = await b.views(routes)
    assert [v.route for v in views] == routes
    for v in views:
        assert v.state is BreakerState.CLOSED
        assert (v.calls_in_window, v.failures_in_window, v.consecutive_failures) == (0, 0, 0)
        assert v.opened_at_ms is None
        assert v.retry_at_ms is None
    assert await b.acquire_probe(routes[0])
    assert [k async for k in r.scan_iter(match=f"*{routes[0]}*")] == []


async def test_keys_expire(r: redis.Redis) -> None:
    b, route = Breakers(r, QUICK), _route()
    await _open(b, route)
    await _past_cooldown(b, route)
    assert await b.acquire_probe(route)
    keys = [k async for k in r.scan_iter(match=f"*{route}*")]
    assert len(keys) == 3
    ttl_ms = 1000 * (3 * CFG.window_s + CFG.probe_timeout_s)
    for key in keys:
        assert 0 < await r.pttl(key) <= ttl_ms


def test_config_is_validated() -> None:
    for bad in ({"window_s": 0}, {"min_calls": 0}, {"failure_rate": 0}, {"failure_rate": 1.5},
                {"consecutive_failures": 0}, {"cooldown_s": -1}, {"probes": 0},
                {"probe_timeout_s": 0}):
        with pytest.raises(ValueError, match="must be"):
            BreakerConfig(**bad)


async def _scripts_run(stack: LocalStack, r: redis.Redis,
                       action: Callable[[], Awaitable[None]], routes: Sequence[str]) -> list[str]:
    """The scripts on any of `routes` that clients ran on Redis while `action` ran, as MONITOR
    shows them (fenced by two ECHOs, so only what happened in between counts)."""
    start, end = f"fence-{uuid.uuid4().hex}", f"fence-{uuid.uuid4().hex}"
    watcher = make_redis(stack.settings.redis)
    scripts: list[str] = []
    try:
        async with asyncio.timeout(10), watcher.monitor() as monitor:
            await r.echo(start)
            while start not in (await monitor.next_command())["command"]:
                pass
            await action()
            await r.echo(end)
            while end not in (command := await monitor.next_command())["command"]:
                text = command["command"]
                if (command["client_type"] != "lua" and text.startswith("EVAL")
                        and any(route in text for route in routes)):
                    scripts.append(text)
    finally:
        await watcher.aclose()
    return scripts
