"""Circuit breakers per route, in Redis, shared by every router worker.

CLOSED: calls flow and every outcome is counted. It opens after `consecutive_failures` failures
in a row, or when at least `min_calls` calls in the last `window_s` failed at `failure_rate` or
more. OPEN: no calls for `cooldown_s`; then the first `acquire_probe` moves it to HALF_OPEN and
takes one of `probes` slots. HALF_OPEN: only probe holders call; a probe success closes it
(window and counts reset), a probe failure opens it again with a fresh cool-down. A probe whose
outcome never arrives gives its slot back after `probe_timeout_s`.

Outcomes of calls that were not probes (started while the route was still CLOSED, reported
after it opened) are counted but move nothing: only a probe decides when a route comes back.

Per route, under a hash tag so that one route's keys share a slot:

    sy:brk:{<route>}:s  hash: state, consec, opened_at, retry_at (Redis wall-clock ms)
    sy:brk:{<route>}:w  hash: the window, WINDOW_BUCKETS buckets of window_s / WINDOW_BUCKETS;
                        c<n> and f<n> are the calls and failures of bucket n (= now_ms // width)
    sy:brk:{<route>}:p  zset: probe tokens held, scored by the ms at which the slot is freed

Every transition is one Lua script and reads the clock with Redis TIME, so workers with skewed
clocks agree. Every write re-arms a TTL of a few windows / cool-downs: a route nobody calls
disappears, and a missing route is CLOSED with nothing counted. The multi-route read script
assumes a single Redis node, like state/bandit.py and state/claims.py.

Who uses them: `workers/router/decide.py` chooses only among routes closed or open for a
probe, `workers/router/attempt.py` takes probes and reports every attempt's outcome, and
`ingress/insights.py` shows each route's breaker in /v1/providers/stats.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import redis.asyncio as redis

from state.degraded import Degraded
from state.runtime import outage
from topics.settings import RouterSettings, default

KEY_PREFIX = "sy:brk:"
WINDOW_BUCKETS = 10
_MAX_CACHED = 4096

_NOW_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function int(x) return string.format('%.0f', x) end
"""

# KEYS: state hash, probe zset. ARGV: probes, probe timeout ms, key ttl ms, token.
# Returns 'closed' (no slot needed), 'probe' (slot taken) or 'denied'.
_ACQUIRE_LUA = _NOW_LUA + """
local now = now_ms()
local cur = redis.call('HMGET', KEYS[1], 'state', 'retry_at')
local state = cur[1] or 'closed'
if state == 'closed' then return 'closed' end
if state == 'open' then
  if now < tonumber(cur[2] or 0) then return 'denied' end
  redis.call('HSET', KEYS[1], 'state', 'half_open')
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[1]) then return 'denied' end
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[2]), ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 'probe'
"""

# KEYS: state hash, window hash, probe zset. ARGV: 1 success / 0 failure, bucket width ms,
# buckets, min calls, failure rate, consecutive failures, cool-down ms, key ttl ms, then the
# probe tokens this process holds for the route, oldest first.
# Returns {state after, index of the token released as the probe (0: not a probe)}.
_RECORD_LUA = _NOW_LUA + """
local now = now_ms()
local success = ARGV[1] == '1'
local cur = redis.call('HMGET', KEYS[1], 'state', 'consec')
local state = cur[1] or 'closed'
local consec = tonumber(cur[2] or 0)

-- The first token still holding a slot makes this outcome the probe's; earlier ones timed out
-- (or belong to an earlier half-open period) and the caller forgets them.
local probe = 0
for i = 9, #ARGV do
  local until_ms = redis.call('ZSCORE', KEYS[3], ARGV[i])
  if until_ms and tonumber(until_ms) > now then
    redis.call('ZREM', KEYS[3], ARGV[i])
    probe = i - 8
    break
  end
end

local width, buckets = tonumber(ARGV[2]), tonumber(ARGV[3])
local bucket = math.floor(now / width)
redis.call('HINCRBY', KEYS[2], 'c' .. int(bucket), 1)
if success then
  consec = 0
else
  consec = consec + 1
  redis.call('HINCRBY', KEYS[2], 'f' .. int(bucket), 1)
end
local calls, failures = 0, 0
local win = redis.call('HGETALL', KEYS[2])
for i = 1, #win, 2 do
  local field = win[i]
  if tonumber(string.sub(field, 2)) <= bucket - buckets then
    redis.call('HDEL', KEYS[2], field)
  elseif string.sub(field, 1, 1) == 'c' then
    calls = calls + tonumber(win[i + 1])
  else
    failures = failures + tonumber(win[i + 1])
  end
end

local reopen = false
if state == 'closed' then
  reopen = consec >= tonumber(ARGV[6])
    or (calls >= tonumber(ARGV[4]) and failures >= tonumber(ARGV[5]) * calls)
elseif state == 'half_open' and probe > 0 then
  if success then
    state = 'closed'
    redis.call('DEL', KEYS[2], KEYS[3])
    redis.call('HSET', KEYS[1], 'state', state, 'consec', 0)
    redis.call('PEXPIRE', KEYS[1], ARGV[8])
    return {state, probe}
  end
  reopen = true
end
if reopen then
  state = 'open'
  -- Probes still out belong to the period that just ended: their outcomes no longer decide.
  redis.call('DEL', KEYS[3])
  redis.call('HSET', KEYS[1], 'opened_at', int(now), 'retry_at', int(now + tonumber(ARGV[7])))
end
redis.call('HSET', KEYS[1], 'state', state, 'consec', consec)
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PEXPIRE', KEYS[2], ARGV[8])
return {state, probe}
"""

# KEYS: (state hash, window hash, probe zset) per route. ARGV: probes, bucket width ms, buckets,
# '1' to sum the windows (views) or '0' (selection only needs state and eligibility).
# Returns per route {state, eligible 1/0, calls, failures, consec, opened_at, retry_at}.
_READ_LUA = _NOW_LUA + """
local now = now_ms()
local probes = tonumber(ARGV[1])
local bucket = math.floor(now / tonumber(ARGV[2]))
local oldest = bucket - tonumber(ARGV[3])
local out = {}
for k = 1, #KEYS, 3 do
  local cur = redis.call('HMGET', KEYS[k], 'state', 'consec', 'opened_at', 'retry_at')
  local state = cur[1] or 'closed'
  local eligible = 1
  if state == 'open' then
    if now < tonumber(cur[4] or 0) then eligible = 0 end
  elseif state == 'half_open' then
    if redis.call('ZCOUNT', KEYS[k + 2], '(' .. int(now), '+inf') >= probes then eligible = 0 end
  end
  local calls, failures = 0, 0
  if ARGV[4] == '1' then
    local win = redis.call('HGETALL', KEYS[k + 1])
    for i = 1, #win, 2 do
      if tonumber(string.sub(win[i], 2)) > oldest then
        if string.sub(win[i], 1, 1) == 'c' then
          calls = calls + tonumber(win[i + 1])
        else
          failures = failures + tonumber(win[i + 1])
        end
      end
    end
  end
  out[#out + 1] = {state, eligible, calls, failures, tonumber(cur[2] or 0),
                   cur[3] or '', cur[4] or ''}
end
return out
"""


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The breakers' configuration; its defaults are the router settings' `breaker_*`.
    Every process that reads or writes breakers (routers, and the ingress for the stats
    route) must agree on it: build it with `from_settings`."""

    # failure-rate window, in WINDOW_BUCKETS buckets
    window_s: float = default(RouterSettings, "breaker_window_s")
    # the failure rate is only judged over at least this many calls
    min_calls: int = default(RouterSettings, "breaker_min_calls")
    # open when failures / calls in the window >= this
    failure_rate: float = default(RouterSettings, "breaker_failure_rate")
    # ...or after this many failures in a row
    consecutive_failures: int = default(RouterSettings, "breaker_consecutive_failures")
    cooldown_s: float = default(RouterSettings, "breaker_cooldown_s")  # open -> half-open
    probes: int = default(RouterSettings, "breaker_probes")  # concurrent probes while half-open
    # a probe slot whose outcome never arrives is freed after this
    probe_timeout_s: float = default(RouterSettings, "breaker_probe_timeout_s")

    @classmethod
    def from_settings(cls, router: RouterSettings) -> BreakerConfig:
        return cls(window_s=router.breaker_window_s, min_calls=router.breaker_min_calls,
                   failure_rate=router.breaker_failure_rate,
                   consecutive_failures=router.breaker_consecutive_failures,
                   cooldown_s=router.breaker_cooldown_s, probes=router.breaker_probes,
                   probe_timeout_s=router.breaker_probe_timeout_s)

    def __post_init__(self) -> None:
        if not self.window_s > 0 or not self.probe_timeout_s > 0 or not self.cooldown_s >= 0:
            raise ValueError("window_s and probe_timeout_s must be > 0, cooldown_s >= 0")
        if self.min_calls < 1 or self.consecutive_failures < 1 or self.probes < 1:
            raise ValueError("min_calls, consecutive_failures and probes must be >= 1")
        if not 0 < self.failure_rate <= 1:
            raise ValueError("failure_rate must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class BreakerView:
    route: str
    state: BreakerState
    calls_in_window: int
    failures_in_window: int
    consecutive_failures: int
    opened_at_ms: int | None  # Redis wall clock when it last opened (kept after it closes)
    retry_at_ms: int | None  # when an open breaker admits a probe; None while closed


@dataclass(frozen=True, slots=True)
class _Status:
    state: BreakerState
    eligible: bool  # closed, or a probe slot could be taken now


class Breakers:
    """One per process. `closed_or_probing` answers from a per-route cache at most
    `cache_ttl_s` old; this process's own `record` and `acquire_probe` invalidate the route's
    entry, so only other workers' changes are seen late (by at most `cache_ttl_s`).

    When Redis is unreachable (`state/runtime.py` `outage`), selection and probes answer from
    the state this process last saw for each route (a route never seen: CLOSED) and an
    outcome that cannot be written is dropped; each fallback is noted in `degraded`. Until a
    read succeeds again (`degraded.down`) nothing waits for Redis: the last-seen state is
    served at once and a read is retried in the background. So during an outage a route this
    process last saw open stays out and one it last saw closed stays in, however long the
    outage lasts. `views` (the stats route) still raises."""

    def __init__(self, client: redis.Redis, config: BreakerConfig, *,
                 cache_ttl_s: float = default(RouterSettings, "breaker_cache_ttl_s"),
                 degraded: Degraded | None = None) -> None:
        self._config = config
        self._degraded = degraded or Degraded()
        # Every route's state as this process last saw it (never expires; the fallback).
        self._known: dict[str, _Status] = {}
        self._cache_ttl_s = cache_ttl_s
        self._bucket_ms = max(1, math.ceil(config.window_s * 1000 / WINDOW_BUCKETS))
        self._cooldown_ms = math.ceil(config.cooldown_s * 1000)
        self._probe_timeout_ms = math.ceil(config.probe_timeout_s * 1000)
        # Long enough that an open route is always past its cool-down (so a probe candidate)
        # before it can be forgotten, and that a probe slot is freed before its key goes.
        self._ttl_ms = math.ceil(
            1000 * (3 * max(config.window_s, config.cooldown_s) + config.probe_timeout_s))
        self._acquire: Any = client.register_script(_ACQUIRE_LUA)
        self._record: Any = client.register_script(_RECORD_LUA)
        self._read: Any = client.register_script(_READ_LUA)
        self._cache: dict[str, tuple[float, _Status]] = {}
        self._pending: dict[str, asyncio.Task[dict[str, _Status]]] = {}
        # Probe tokens this process was granted and has not reported yet, oldest first.
        self._tokens: dict[str, list[str]] = {}


    @property
    def cooldown_s(self) -> float:
        """How long an open breaker refuses calls before a probe may try the route again."""
        return self._config.cooldown_s

    @property
    def config(self) -> BreakerConfig:
        return self._config

    async def closed_or_probing(self, routes: Sequence[str]) -> set[str]:
        """The routes that may be selected now: CLOSED ones, and OPEN (past the cool-down) or
        HALF_OPEN ones with a free probe slot. Takes no slot: a non-CLOSED route chosen from
        this set must still win `acquire_probe`."""
        now = time.monotonic()
        out: set[str] = set()
        waits: dict[asyncio.Task[dict[str, _Status]], list[str]] = {}
        missing: list[str] = []
        down = self._degraded.down
        stale: list[str] = []
        for route in dict.fromkeys(routes):
            entry = self._cache.get(route)
            if entry is not None and now - entry[0] < self._cache_ttl_s:
                if entry[1].eligible:
                    out.add(route)
            elif down:
                stale.append(route)
            elif (task := self._pending.get(route)) is not None:
                waits.setdefault(task, []).append(route)
            else:
                missing.append(route)
        if stale:
            # Redis is down: no waiting. A read in the background finds out when it is back.
            if retry := [route for route in stale if route not in self._pending]:
                self._start_read(retry)
            out.update(self._last_seen(stale, None))
        if missing:
            waits[self._start_read(missing)] = missing
        for task, wanted in waits.items():
            try:
                # shield: one cancelled caller must not cancel the read the others wait for
                statuses = await asyncio.shield(task)
            except Exception as exc:
                if outage(exc) is None:
                    raise
                out.update(self._last_seen(wanted, exc))
                continue
            out.update(route for route in wanted if statuses[route].eligible)
        return out

    def _last_seen(self, routes: list[str], exc: BaseException | None) -> list[str]:
        """The eligible ones of `routes` by the states this process last saw (or CLOSED)."""
        self._degraded.note("circuit breakers", "selecting on the breaker states last seen",
                            exc)
        return [route for route in routes if self._known.get(route, _CLOSED).eligible]

    async def acquire_probe(self, route: str) -> bool:
        """True if this caller may call `route`: it is CLOSED (per the cache, like
        `closed_or_probing`: no round trip), or it is past its cool-down and this caller got
        one of the `probes` slots (atomic; the caller must then `record` the outcome)."""
        entry = self._cache.get(route)
        if (entry is not None and entry[1].state is BreakerState.CLOSED
                and time.monotonic() - entry[0] < self._cache_ttl_s):
            return True
        if self._degraded.down:
            return self._probe_unknown(route, None)
        token = uuid.uuid4().hex
        try:
            granted = _text(await self._acquire(
                keys=[_key(route, "s"), _key(route, "p")],
                args=[self._config.probes, self._probe_timeout_ms, self._ttl_ms, token]))
        except Exception as exc:
            if outage(exc) is None:
                raise
            return self._probe_unknown(route, exc)
        if granted == "closed":
            self._known[route] = _CLOSED
            return True
        self._invalidate(route)
        if granted != "probe":
            return False
        self._tokens.setdefault(route, []).append(token)
        return True

    def _probe_unknown(self, route: str, exc: BaseException | None) -> bool:
        """Redis is down: a route last seen CLOSED (or never seen) may be called; one last
        seen open or half-open may not (no probe slot can be taken)."""
        self._degraded.note("circuit breakers", "probing by the breaker states last seen", exc)
        return self._known.get(route, _CLOSED).state is BreakerState.CLOSED

    async def record(self, route: str, success: bool, *, open_now: bool = False) -> BreakerState:
        """Count one outcome and apply the transitions (one script). If this process holds a
        live probe slot for the route, the outcome is the probe's and releases it. Returns the
        state after. `open_now`: a failure that says the route can serve nobody (the
        provider refused our key): a closed route opens at once. Redis down: the outcome is
        dropped and the state last seen returned."""
        cfg = self._config
        held = list(self._tokens.get(route, ()))
        issued = time.monotonic()
        if self._degraded.down:
            return self._dropped(route, None)
        try:
            state, released = await self._record(
                keys=[_key(route, "s"), _key(route, "w"), _key(route, "p")],
                args=[1 if success else 0, self._bucket_ms, WINDOW_BUCKETS, cfg.min_calls,
                      repr(float(cfg.failure_rate)),
                      1 if open_now and not success else cfg.consecutive_failures,
                      self._cooldown_ms, self._ttl_ms, *held])
        except Exception as exc:
            if outage(exc) is None:
                raise
            return self._dropped(route, exc)
        # The released token, and every one before it (dead), are done with; all are when
        # none was live.
        spent = held[:int(released)] if int(released) else held
        if spent:
            remaining = [t for t in self._tokens.get(route, ()) if t not in spent]
            if remaining:
                self._tokens[route] = remaining
            else:
                self._tokens.pop(route, None)
        after = BreakerState(_text(state))
        self._invalidate(route)
        self._known[route] = _Status(after, after is BreakerState.CLOSED)
        if after is BreakerState.CLOSED:
            # What the script just said is as fresh as a read: without this, every outcome
            # would cost the next request on the route a round trip in `acquire_probe`.
            self._cache[route] = (issued, _Status(after, True))
        return after

    def _dropped(self, route: str, exc: BaseException | None) -> BreakerState:
        self._degraded.note("circuit breakers", "outcome not counted", exc)
        return self._known.get(route, _CLOSED).state

    async def drain(self) -> None:
        """Wait for the reads in flight: before the Redis client closes, so none of them
        opens a connection on a closed client."""
        await asyncio.gather(*set(self._pending.values()), return_exceptions=True)

    async def views(self, routes: Sequence[str]) -> list[BreakerView]:
        """Every route's breaker, in order, read now (uncached). One round trip."""
        raw = await self._read(keys=_keys(routes), args=self._read_args(full=True))
        return [
            BreakerView(route=route, state=BreakerState(_text(row[0])), calls_in_window=int(row[2]),
                        failures_in_window=int(row[3]), consecutive_failures=int(row[4]),
                        opened_at_ms=_ms(row[5]),
                        retry_at_ms=None if _text(row[0]) == "closed" else _ms(row[6]))
            for route, row in zip(routes, raw, strict=True)]

    def _start_read(self, routes: list[str]) -> asyncio.Task[dict[str, _Status]]:
        task = asyncio.create_task(self._read_statuses(routes))
        # If every waiter was cancelled nobody retrieves a failure: do it so asyncio does not
        # log it as lost.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        for route in routes:
            self._pending[route] = task
        return task

    async def _read_statuses(self, routes: list[str]) -> dict[str, _Status]:
        me = asyncio.current_task()
        issued = time.monotonic()  # an entry's age counts from here, not from the reply
        try:
            raw = await self._read(keys=_keys(routes), args=self._read_args(full=False))
            statuses = {route: _Status(BreakerState(_text(row[0])), bool(int(row[1])))
                        for route, row in zip(routes, raw, strict=True)}
            self._degraded.up()
            if len(self._known) >= _MAX_CACHED:
                self._known.clear()
            self._known.update(statuses)
            if len(self._cache) >= _MAX_CACHED:
                self._evict()
            for route, status in statuses.items():
                # An entry invalidated while this read was in flight may predate the change
                # that invalidated it: it is not cached.
                if self._pending.get(route) is me:
                    self._cache[route] = (issued, status)
            return statuses
        finally:
            for route in routes:
                if self._pending.get(route) is me:
                    del self._pending[route]

    def _invalidate(self, route: str) -> None:
        self._cache.pop(route, None)
        self._pending.pop(route, None)  # later callers read afresh; current waiters keep theirs

    def _evict(self) -> None:
        now = time.monotonic()
        for route in [r for r, (at, _) in self._cache.items() if now - at >= self._cache_ttl_s]:
            del self._cache[route]
        if len(self._cache) >= _MAX_CACHED:
            self._cache.clear()

    def _read_args(self, *, full: bool) -> list[int]:
        return [self._config.probes, self._bucket_ms, WINDOW_BUCKETS, 1 if full else 0]


_CLOSED = _Status(BreakerState.CLOSED, True)


def _key(route: str, kind: str) -> str:
    return f"{KEY_PREFIX}{{{route}}}:{kind}"


def _keys(routes: Sequence[str]) -> list[str]:
    return [_key(route, kind) for route in routes for kind in ("s", "w", "p")]


def _ms(value: bytes | str | int) -> int | None:
    text = _text(value) if not isinstance(value, int) else str(value)
    return int(text) if text else None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
