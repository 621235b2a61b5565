"""The bandit's storage: its posteriors in Redis, shared by every router worker.

The other files of the feature: `topics/bandit.py` is the maths (reward, update weights,
decay, the draw, PRIOR), `workers/router/decide.py` is where routing reads and updates these
posteriors; the ingress's stats and feedback routes (`ingress/insights.py`) read and update
them too.

One hash per arm, `sy:post:<category>:<route>`:

    alpha, beta   the Beta posterior as of `updated_ms` (decimal text, 17 significant digits)
    updated_ms    Redis server time of the last update (the decay clock; never the caller's)
    selections    times a router chose the arm (HINCRBY, `note_selection`)
    successes, failures   outcomes counted
    feedback, quality_sum late quality scores counted, and their sum (mean quality)

plus `sy:post-lat:<category>:<route>`, a list of the latencies (ms) of the last
LATENCY_WINDOW successful outcomes, newest first: p50/p95 for the stats endpoint are exact
percentiles over that recent window, so they follow a degradation within a few hundred calls.
Failed attempts are not in it (an instant 5xx or a timeout says nothing about speed).

Every update is one Lua script, atomic: `SET NX` on the event's dedupe key (a redelivered event
changes nothing), decay of (alpha, beta) toward the prior by the Redis time elapsed since
`updated_ms`, then the increment (weight * value to alpha, weight * (1 - value) to beta; the
weights are `topics.bandit.outcome_weight` / `feedback_weight`). Reads decay to the current
Redis time too, in Lua, so the arithmetic lives in one place here and mirrors
`topics.bandit.decay` (the tests check both agree to 1e-9). Multi-key scripts assume a single
Redis node, like state/claims.py.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis.asyncio as redis

from state.degraded import Degraded
from state.runtime import outage
from topics.bandit import MAX_FEEDBACK_WEIGHT, PRIOR

_POST = "sy:post:"
_LAT = "sy:post-lat:"
_SEEN_OUTCOME = "sy:post-seen:o:"
_SEEN_FEEDBACK = "sy:post-seen:f:"
LATENCY_WINDOW = 200

# Decay, shared by both scripts: x' = prior + (x - prior) * 0.5 ^ (elapsed_s / half_life_s),
# the same operations in the same order as topics.bandit.decay. hl <= 0 = no decay.
_DECAY_LUA = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function decayed(cur, pa, pb, hl, now)
  if not (cur[1] and cur[2] and cur[3]) then return pa, pb end
  local a, b = tonumber(cur[1]), tonumber(cur[2])
  local elapsed = (now - tonumber(cur[3])) / 1000
  if elapsed <= 0 or hl <= 0 then return a, b end
  local f = 0.5 ^ (elapsed / hl)
  return pa + (a - pa) * f, pb + (b - pb) * f
end
local function num(x) return string.format('%.17g', x) end
"""

# KEYS: dedupe, arm hash, latency list. ARGV: dedupe ttl s, prior alpha, prior beta, half-life
# s, alpha increment, beta increment, counter field, latency ms or '', window, quality or ''.
_UPDATE_LUA = _DECAY_LUA + """
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then return 0 end
local now = now_ms()
local cur = redis.call('HMGET', KEYS[2], 'alpha', 'beta', 'updated_ms')
local a, b = decayed(cur, tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4]), now)
a = a + tonumber(ARGV[5])
b = b + tonumber(ARGV[6])
redis.call('HSET', KEYS[2], 'alpha', num(a), 'beta', num(b), 'updated_ms', num(now))
redis.call('HINCRBY', KEYS[2], ARGV[7], 1)
if ARGV[8] ~= '' then
  redis.call('LPUSH', KEYS[3], ARGV[8])
  redis.call('LTRIM', KEYS[3], 0, tonumber(ARGV[9]) - 1)
end
if ARGV[10] ~= '' then redis.call('HINCRBYFLOAT', KEYS[2], 'quality_sum', ARGV[10]) end
return 1
"""

# KEYS: arm hashes. ARGV: prior alpha, prior beta, half-life s.
# Returns {now_ms, alpha1, beta1, updated_ms1 or '', alpha2, ...}; missing arms are the prior.
_READ_LUA = _DECAY_LUA + """
local pa, pb, hl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = now_ms()
local out = {num(now)}
for _, key in ipairs(KEYS) do
  local cur = redis.call('HMGET', key, 'alpha', 'beta', 'updated_ms')
  local a, b = decayed(cur, pa, pb, hl, now)
  out[#out + 1] = num(a)
  out[#out + 1] = num(b)
  out[#out + 1] = cur[3] or ''
end
return out
"""

_COUNTERS = ("selections", "successes", "failures", "feedback", "quality_sum")


class Posterior(NamedTuple):
    """Beta(alpha, beta), already decayed to the time it was read. Usable as the
    `(alpha, beta)` tuple `ThompsonSampler` (workers/router/sampler.py) takes."""

    alpha: float
    beta: float

    @property
    def mean(self) -> float:
        return self.alpha / (self.alpha + self.beta)


@dataclass(frozen=True, slots=True)
class ArmStats:
    """One arm, for `/v1/providers/stats` (`dataclasses.asdict` gives the JSON object)."""

    category: str
    route: str
    alpha: float
    beta: float
    mean: float  # posterior mean of the reward, decayed to now
    selections: int
    successes: int
    failures: int
    error_rate: float | None  # failures / outcomes, lifetime; None before any outcome
    latency_p50_ms: float | None  # over the last LATENCY_WINDOW successes
    latency_p95_ms: float | None
    feedback: int
    mean_quality: float | None


class PosteriorStore:
    """The posteriors of every (category, route) arm. The prior defaults to PRIOR, which the
    router's ThompsonSampler also uses; the half-life comes from the router's settings."""

    def __init__(self, client: redis.Redis, *, prior: tuple[float, float] = PRIOR,
                 half_life_s: float, dedupe_ttl_s: int = 86400) -> None:
        if min(prior) <= 0:
            raise ValueError("prior alpha and beta must be > 0")
        if not half_life_s > 0:
            raise ValueError("half_life_s must be > 0 (math.inf: never decay)")
        self._redis = client
        self.prior = Posterior(float(prior[0]), float(prior[1]))
        self.half_life_s = half_life_s
        # The scripts take 0 for "never decay"; inf would not survive Lua's number parsing
        # on every platform.
        self._hl_arg = 0.0 if math.isinf(half_life_s) else float(half_life_s)
        self._dedupe_ttl_s = dedupe_ttl_s
        self._update: Any = client.register_script(_UPDATE_LUA)
        self._read: Any = client.register_script(_READ_LUA)

    async def update(self, event_id: str, category: str, route: str, reward: float, *,
                     success: bool, latency_ms: float | None, weight: float = 1.0) -> bool:
        """Count one outcome once per `event_id`: alpha += weight * reward,
        beta += weight * (1 - reward). False if the event was already counted; then nothing
        changed. `weight` is `topics.bandit.outcome_weight(...)`: 1, or less for a
        success whose quality score is still to come (see `feedback`)."""
        _check_unit(reward, "reward")
        _check_weight(weight)
        latency = "" if latency_ms is None or not success else repr(float(latency_ms))
        return await self._apply(_SEEN_OUTCOME + event_id, category, route, weight * reward,
                                 weight * (1.0 - reward), "successes" if success else "failures",
                                 latency, "")

    async def feedback(self, event_id: str, category: str, route: str, quality: float, *,
                       weight: float) -> bool:
        """Count a late quality score for an answered request, once per `event_id`:
        alpha += weight * quality, beta += weight * (1 - quality).

        `weight` is `topics.bandit.feedback_weight(tenant weights, feedback rate)`:
        the quality weight's share of the tenant's weights, divided by the fraction of answers
        that get scored. With the outcome counted at 1 - that share, each request is worth
        one observation in expectation and the posterior mean is the mean reward with quality
        in it."""
        _check_unit(quality, "quality")
        _check_weight(weight)
        return await self._apply(_SEEN_FEEDBACK + event_id, category, route, weight * quality,
                                 weight * (1.0 - quality), "feedback", "", repr(quality))

    async def _apply(self, seen: str, category: str, route: str, d_alpha: float,
                     d_beta: float, counter: str, latency: str, quality: str) -> bool:
        done = await self._update(
            keys=[seen, _key(_POST, category, route), _key(_LAT, category, route)],
            args=[self._dedupe_ttl_s, self.prior.alpha, self.prior.beta, self._hl_arg,
                  d_alpha, d_beta, counter, latency, LATENCY_WINDOW, quality])
        return bool(done)

    async def read(self, category: str, routes: Sequence[str]) -> dict[str, Posterior]:
        """Each route's posterior decayed to the current Redis time (missing arms: the prior).
        One round trip."""
        return (await self.read_at(category, routes))[1]

    async def read_at(self, category: str,
                      routes: Sequence[str]) -> tuple[int, dict[str, Posterior]]:
        """`read`, plus the Redis time (ms) the posteriors were decayed to."""
        raw = await self._read(keys=[_key(_POST, category, r) for r in routes],
                               args=self._read_args())
        return _parse_read(raw, routes)

    async def note_selection(self, category: str, route: str) -> None:
        """Count a choice (stats only; the posterior moves on outcomes). Cheap enough to
        await; a caller may also run it as a background task."""
        await self._redis.hincrby(_key(_POST, category, route), "selections", 1)

    async def stats(self, categories: Sequence[str], routes: Sequence[str]) -> list[ArmStats]:
        """Every (category, route) arm, in that order: one pipeline (redis-py checks with
        SCRIPT EXISTS first that the read script is loaded: two round trips in all)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for category in categories:
                await self._read(keys=[_key(_POST, category, r) for r in routes],
                                 args=self._read_args(), client=pipe)
                for route in routes:
                    pipe.hmget(_key(_POST, category, route), _COUNTERS)
                    pipe.lrange(_key(_LAT, category, route), 0, -1)
            replies: list[Any] = await pipe.execute()
        out: list[ArmStats] = []
        per_category = 1 + 2 * len(routes)
        for i, category in enumerate(categories):
            chunk = replies[i * per_category:(i + 1) * per_category]
            _, posteriors = _parse_read(chunk[0], routes)
            for j, route in enumerate(routes):
                counters, window = chunk[1 + 2 * j], chunk[2 + 2 * j]
                out.append(_arm_stats(category, route, posteriors[route], counters, window))
        return out

    def _read_args(self) -> list[float]:
        return [self.prior.alpha, self.prior.beta, self._hl_arg]


class CachedPosteriors:
    """Read-through cache per (category, set of routes), so a decision usually costs no round
    trip. A value is served for `ttl_s` after its read was issued, never longer (except on a
    Redis error, below). Once it is `refresh_after_s` old, the next decision starts a refresh
    in the background and still gets the cached value: under steady traffic decisions never
    wait for Redis; only the first one after an idle `ttl_s` does.

    Concurrent misses on one key share a single read. If a read fails because Redis is
    unreachable (`state/runtime.py` `outage`), the last value read for the key is served
    whatever its age, or the prior for every route if none was; until a read succeeds again
    (`degraded.down`), callers do not wait for Redis at all: they get that fallback at once
    and a read is retried in the background. Each fallback is noted in `degraded`. Returned
    mappings are shared: do not mutate."""

    def __init__(self, store: PosteriorStore, ttl_s: float = 0.1, *,
                 refresh_after_s: float | None = None, max_entries: int = 4096,
                 clock: Callable[[], float] = time.monotonic,
                 degraded: Degraded | None = None) -> None:
        self._store = store
        self._ttl_s = ttl_s
        self._refresh_after_s = ttl_s / 2 if refresh_after_s is None else refresh_after_s
        self._degraded = degraded or Degraded()
        self._max_entries = max_entries
        self._clock = clock
        self._entries: dict[_CacheKey, tuple[float, dict[str, Posterior]]] = {}
        self._pending: dict[_CacheKey, asyncio.Task[dict[str, Posterior]]] = {}

    async def get(self, category: str, routes: Sequence[str]) -> Mapping[str, Posterior]:
        key = (category, frozenset(routes))
        entry = self._entries.get(key)
        if entry is not None:
            age = self._clock() - entry[0]
            if age < self._ttl_s:
                if age >= self._refresh_after_s and key not in self._pending:
                    self._start(key)  # refresh ahead; this decision does not wait for it
                return entry[1]
        if self._degraded.down:
            if key not in self._pending:
                self._start(key)  # finds out whether Redis is back; nobody waits for it
            return self._fallback(key, entry, None)
        task = self._pending.get(key) or self._start(key)
        try:
            # shield: one cancelled caller must not cancel the read the others wait for
            return await asyncio.shield(task)
        except Exception as exc:
            if outage(exc) is None:
                raise
            return self._fallback(key, entry, exc)

    def _fallback(self, key: _CacheKey, entry: tuple[float, dict[str, Posterior]] | None,
                  exc: BaseException | None) -> Mapping[str, Posterior]:
        if entry is not None:
            self._degraded.note("bandit posteriors", f"ranking on posteriors read "
                                f"{self._clock() - entry[0]:.1f} s ago", exc)
            return entry[1]
        self._degraded.note("bandit posteriors", "ranking on the prior (none read yet)", exc)
        return dict.fromkeys(key[1], self._store.prior)

    def invalidate(self) -> None:
        self._entries.clear()

    async def drain(self) -> None:
        """Wait for the refreshes in flight: before the Redis client closes, so none of them
        opens a connection on a closed client."""
        await asyncio.gather(*self._pending.values(), return_exceptions=True)

    def _start(self, key: _CacheKey) -> asyncio.Task[dict[str, Posterior]]:
        task = asyncio.create_task(self._refresh(key))
        # A background refresh may fail with nobody awaiting it: retrieve the error so asyncio
        # does not log it as lost (the next blocking read reports it).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._pending[key] = task
        return task

    async def _refresh(self, key: _CacheKey) -> dict[str, Posterior]:
        try:
            issued = self._clock()  # the value's age counts from here, not from its arrival
            value = await self._store.read(key[0], sorted(key[1]))
            self._degraded.up()
            if len(self._entries) >= self._max_entries:
                self._evict()
            self._entries[key] = (issued, value)
            return value
        finally:
            del self._pending[key]

    def _evict(self) -> None:
        now = self._clock()
        for key in [k for k, (at, _) in self._entries.items() if now - at >= self._ttl_s]:
            del self._entries[key]
        if len(self._entries) >= self._max_entries:
            self._entries.clear()


_CacheKey = tuple[str, frozenset[str]]


def arm_keys(category: str, route: str) -> list[str]:
    """The Redis keys of one arm's learning (to forget it: tests, an operator's reset)."""
    return [_key(_POST, category, route), _key(_LAT, category, route)]


def _key(prefix: str, category: str, route: str) -> str:
    return f"{prefix}{category}:{route}"


def _check_weight(weight: float) -> None:
    if not 0.0 <= weight <= MAX_FEEDBACK_WEIGHT:
        raise ValueError(f"weight must be in [0, {MAX_FEEDBACK_WEIGHT}], got {weight!r}")


def _check_unit(value: float, name: str) -> None:
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def _parse_read(raw: Sequence[bytes | str],
                routes: Sequence[str]) -> tuple[int, dict[str, Posterior]]:
    values = [_text(v) for v in raw]
    posteriors = {route: Posterior(float(values[1 + 3 * i]), float(values[2 + 3 * i]))
                  for i, route in enumerate(routes)}
    return int(float(values[0])), posteriors


def _arm_stats(category: str, route: str, posterior: Posterior,
               counters: Sequence[bytes | None], window: Sequence[bytes]) -> ArmStats:
    sel, ok, fail, fb = (int(c) if c is not None else 0 for c in counters[:4])
    quality_sum = float(counters[4]) if counters[4] is not None else 0.0
    latencies = sorted(float(v) for v in window)
    return ArmStats(category=category, route=route, alpha=posterior.alpha, beta=posterior.beta,
                    mean=posterior.mean, selections=sel, successes=ok, failures=fail,
                    error_rate=fail / (ok + fail) if ok + fail else None,
                    latency_p50_ms=_percentile(latencies, 0.50),
                    latency_p95_ms=_percentile(latencies, 0.95),
                    feedback=fb, mean_quality=quality_sum / fb if fb else None)


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending sequence."""
    if not ordered:
        return None
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
