"""Spend budgets in PostgreSQL (the `budgets` table, 010_budgets.sql) and in Redis (spent and
reserved counters, reservations), where two Lua scripts keep them exact across every ingress
and router: `queue_reserve` (admission) and `settle` (the request's real cost).

What a budget is: `topics/budgets.py`. Who calls: `ingress/budgets.py` (admission, admin API),
`workers/router/budgets.py` (the batch path's admission, settlement, alerts).

Redis keys, all of one tenant under one hash tag `{tenant}`; money in integer nano-dollars:
- `bud:{T}:s:<scope>:<period tag>`: spent (settled) in the budget's current period. Seeded
  from the ledger when missing (`seed`, SET NX): a Redis restart does not reset spend. A
  settlement never creates it (it would hide the ledger's spend), it only adds to it.
- `bud:{T}:r:<scope>:<period tag>`: reserved by requests in flight.
- `bud:{T}:a:<scope>:<period tag>`: the highest alert level (percent) already sent.
- `bud:{T}:rz` (ZSET request id → deadline ms) and `bud:{T}:rh` (HASH request id →
  "amount|reserved key|…"): the reservations; admission releases those past their deadline.
- `bud:{T}:done:<request id>`: a settlement applied (once per request id).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

import asyncpg
import redis.asyncio as redis
from redis.exceptions import NoScriptError

from state.cache import ReadThroughCache
from state.tenancy import tenant_scope
from topics.budgets import Budget, Period, period_start, period_tag, reset_at, to_nano
from topics.tenants import TIER_LIMITS, Tier

# ---- PostgreSQL -------------------------------------------------------------------------

_COLUMNS = ("key_id, period, limit_usd, hard, alert_threshold_pct, webhook_url, fail_open")


def _budget(tenant_id: str, row: asyncpg.Record) -> Budget:
    return Budget(tenant_id=tenant_id, key_id=row["key_id"] or None, period=row["period"],
                  limit_usd=row["limit_usd"], hard=row["hard"],
                  alert_threshold_pct=row["alert_threshold_pct"],
                  webhook_url=row["webhook_url"], fail_open=row["fail_open"])


async def load_budgets(pool: asyncpg.Pool, tenant_id: str) -> list[Budget]:
    """Every budget of the tenant and its keys. The tenant's monthly budget, when it has no
    row of its own: the tenant's `monthly_budget_usd` (else its tier's), hard when its tier
    says so (the seed's trial tier: $10, hard)."""
    async with tenant_scope(pool, tenant_id) as conn:
        rows = await conn.fetch(f"SELECT {_COLUMNS} FROM budgets WHERE tenant_id = $1",
                                tenant_id)
        tenant = await conn.fetchrow(
            "SELECT tier, monthly_budget_usd FROM tenants WHERE id = $1", tenant_id)
    budgets = [_budget(tenant_id, row) for row in rows]
    if tenant is not None and not any(b.key_id is None and b.period == "month"
                                      for b in budgets):
        tier = TIER_LIMITS[Tier(tenant["tier"])]
        limit = tenant["monthly_budget_usd"] or tier.monthly_budget_usd
        if limit is not None:
            budgets.append(Budget(tenant_id=tenant_id, key_id=None, period="month",
                                  limit_usd=limit, hard=tier.budget_hard_cap))
    return budgets


async def put_budget(pool: asyncpg.Pool, budget: Budget) -> None:
    async with tenant_scope(pool, budget.tenant_id) as conn:
        await conn.execute(
            "INSERT INTO budgets (tenant_id, key_id, period, limit_usd, hard,"
            " alert_threshold_pct, webhook_url, fail_open) VALUES ($1, $2, $3, $4, $5, $6,"
            " $7, $8) ON CONFLICT (tenant_id, key_id, period) DO UPDATE SET"
            " limit_usd = EXCLUDED.limit_usd, hard = EXCLUDED.hard,"
            " alert_threshold_pct = EXCLUDED.alert_threshold_pct,"
            " webhook_url = EXCLUDED.webhook_url, fail_open = EXCLUDED.fail_open,"
            " updated_at = now()",
            budget.tenant_id, budget.key_id or "", budget.period, budget.limit_usd,
            budget.hard, budget.alert_threshold_pct, budget.webhook_url, budget.fail_open)


async def delete_budget(pool: asyncpg.Pool, tenant_id: str, key_id: str | None,
                        period: Period) -> bool:
    async with tenant_scope(pool, tenant_id) as conn:
        done: str = await conn.execute(
            "DELETE FROM budgets WHERE tenant_id = $1 AND key_id = $2 AND period = $3",
            tenant_id, key_id or "", period)
    return done != "DELETE 0"


async def ledger_spend(pool: asyncpg.Pool, budget: Budget, at: datetime) -> Decimal:
    """What the ledger holds of the budget's current period: the daily rollup for a tenant,
    the ledger's rows (by key, indexed by tenant and time) for a key."""
    start = period_start(budget.period, at)
    async with tenant_scope(pool, budget.tenant_id) as conn:
        if budget.key_id is None:
            value = await conn.fetchval(
                "SELECT coalesce(sum(cost_usd), 0) FROM usage_daily WHERE tenant_id = $1"
                " AND day >= $2::date", budget.tenant_id, start.date())
        else:
            value = await conn.fetchval(
                "SELECT coalesce(sum(cost_usd), 0) FROM usage_events WHERE tenant_id = $1"
                " AND key_id = $2 AND started_at >= $3", budget.tenant_id, budget.key_id,
                start)
    return Decimal(value)


class BudgetCache:
    """A tenant's budgets, cached in-process for `ttl_s` (a change through the admin API
    invalidates this process's entry; other processes see it within `ttl_s`)."""

    def __init__(self, pool: asyncpg.Pool, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        async def load(tenant_id: str) -> list[Budget]:
            return await load_budgets(pool, tenant_id)

        self._cache: ReadThroughCache[str, list[Budget]] = ReadThroughCache(
            load, ttl_s=ttl_s, max_entries=10_000, clock=clock)

    async def budgets(self, tenant_id: str, key_id: str) -> list[Budget]:
        """The budgets that apply to a request of `key_id`: the tenant's and the key's."""
        return [b for b in await self._cache.get(tenant_id)
                if b.key_id is None or b.key_id == key_id]

    async def fresh(self, tenant_id: str, key_id: str) -> list[Budget]:
        """As `budgets`, read now: the batch path's admission, exact after a change."""
        self._cache.invalidate(tenant_id)
        return await self.budgets(tenant_id, key_id)

    def invalidate(self, tenant_id: str) -> None:
        self._cache.invalidate(tenant_id)


# ---- Redis -------------------------------------------------------------------------------

def _prefix(tenant_id: str) -> str:
    return f"bud:{{{tenant_id}}}"


def counter_key(kind: Literal["s", "r", "a"], budget: Budget, at: datetime) -> str:
    scope = "t" if budget.key_id is None else f"k:{budget.key_id}"
    return f"{_prefix(budget.tenant_id)}:{kind}:{scope}:{period_tag(budget.period, at)}"


def _ttl_s(budget: Budget, at: datetime) -> int:
    # A counter outlives its period by a day: the one that follows starts from nothing.
    return int((reset_at(budget.period, at) - at).total_seconds()) + 86_400


# Releases expired reservations, then (all spent counters present) reserves ARGV[4]
# nano-dollars in every budget, unless a hard one would go over: {"ok"}, {"over", i, used}
# (budget i, 1-based; used = spent + reserved) or {"seed", i, …} (counters to seed first).
_RELEASE_LUA = """
local function release(hash, id)
  local rec = redis.call('HGET', hash, id)
  if rec then
    local amount = nil
    for part in string.gmatch(rec, '[^|]+') do
      if amount == nil then amount = part
      elseif redis.call('DECRBY', part, amount) < 0 then
        redis.call('SET', part, 0, 'KEEPTTL')
      end
    end
    redis.call('HDEL', hash, id)
  end
end
"""
_RESERVE_LUA = _RELEASE_LUA + """
local now = tonumber(ARGV[1])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, 200)) do
  release(KEYS[2], id)
  redis.call('ZREM', KEYS[1], id)
end
local n = (#KEYS - 2) / 2
local missing = {'seed'}
for i = 1, n do
  if redis.call('EXISTS', KEYS[2 * i + 1]) == 0 then table.insert(missing, i) end
end
if #missing > 1 then return missing end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return {'ok'} end
local amount = tonumber(ARGV[4])
for i = 1, n do
  local limit = tonumber(ARGV[4 + 2 * i - 1])
  if limit >= 0 then
    local used = tonumber(redis.call('GET', KEYS[2 * i + 1]) or '0')
               + tonumber(redis.call('GET', KEYS[2 * i + 2]) or '0')
    if used + amount > limit then return {'over', i, used} end
  end
end
local rec = ARGV[4]
for i = 1, n do
  redis.call('INCRBY', KEYS[2 * i + 2], ARGV[4])
  redis.call('EXPIRE', KEYS[2 * i + 2], ARGV[4 + 2 * i])
  rec = rec .. '|' .. KEYS[2 * i + 2]
end
redis.call('HSET', KEYS[2], ARGV[2], rec)
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return {'ok'}
"""
# The alert levels (percent) budgets reached for the first time this period: for budget i,
# KEYS[o + 2i - 1] its spent counter, KEYS[o + 2i] the highest level already sent,
# ARGV[o + 2i - 1] its limit, ARGV[o + 2i] its levels; {i, level, spent, …}.
_ALERTS_LUA_BODY = """
local alerts = {}
for i = 1, n do
  local spent = KEYS[o + 2 * i - 1]
  local total = tonumber(redis.call('GET', spent) or '-1')
  local limit = tonumber(ARGV[o + 2 * i - 1])
  if total >= 0 and limit > 0 then
    local sent = tonumber(redis.call('GET', KEYS[o + 2 * i]) or '0')
    local top = sent
    for level in string.gmatch(ARGV[o + 2 * i], '%d+') do
      local l = tonumber(level)
      if l > sent and total * 100 >= limit * l then
        table.insert(alerts, i); table.insert(alerts, l); table.insert(alerts, total)
        if l > top then top = l end
      end
    end
    if top > sent then
      redis.call('SET', KEYS[o + 2 * i], top)
      redis.call('PEXPIRE', KEYS[o + 2 * i], redis.call('PTTL', spent))
    end
  end
end
"""
_ALERTS_LUA = """
local n, o = #KEYS / 2, 0
""" + _ALERTS_LUA_BODY + """
return alerts
"""
# Once per request id (KEYS[3]): releases the reservation, adds ARGV[2] nano-dollars to
# the spent counters (those that exist: a missing one is seeded from the ledger, which has
# this cost too); returns {stale, i, level, spent, …}: the alerts of the budgets in KEYS,
# and stale = 1 when the reservation was made in a budget that is not among them (the
# caller's view of the budgets is older than the ingress's: it looks again and asks
# `_ALERTS_LUA`).
_SETTLE_LUA = """
if not redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[3]) then return {0} end
local n, o = (#KEYS - 3) / 2, 3
local stale = 0
local rec = redis.call('HGET', KEYS[2], ARGV[1])
if rec then
  -- The budgets the request reserved in: their spent counters take its cost.
  local known = {}
  for i = 1, n do known[KEYS[3 + 2 * i - 1]] = true end
  local amount = nil
  for part in string.gmatch(rec, '[^|]+') do
    if amount == nil then amount = part
    else
      if redis.call('DECRBY', part, amount) < 0 then redis.call('SET', part, 0, 'KEEPTTL') end
      local spent = string.gsub(part, ':r:', ':s:', 1)
      if redis.call('EXISTS', spent) == 1 then redis.call('INCRBY', spent, ARGV[2]) end
      if not known[spent] then stale = 1 end
    end
  end
  redis.call('HDEL', KEYS[2], ARGV[1])
else
  -- Released already (past its deadline) or never reserved (admitted while the budget did
  -- not exist yet): the budgets that apply now.
  for i = 1, n do
    if redis.call('EXISTS', KEYS[3 + 2 * i - 1]) == 1 then
      redis.call('INCRBY', KEYS[3 + 2 * i - 1], ARGV[2])
    end
  end
end
redis.call('ZREM', KEYS[1], ARGV[1])
""" + _ALERTS_LUA_BODY + """
table.insert(alerts, 1, stale)
return alerts
"""


@dataclass(frozen=True, slots=True)
class Reservation:
    """What one request asks of its budgets at admission."""

    tenant_id: str
    request_id: str
    deadline_ms: int
    amount_nano: int
    budgets: Sequence[Budget]
    at: datetime  # the request's arrival: which period it counts in


@dataclass(frozen=True, slots=True)
class Outcome:
    kind: Literal["ok", "over", "seed", "noscript"]
    budget: Budget | None = None  # over: the first hard budget that would go over
    used_nano: int = 0  # over: its spent + reserved
    missing: tuple[Budget, ...] = ()  # seed: counters to load from the ledger


@dataclass(frozen=True, slots=True)
class Alert:
    budget: Budget
    level_pct: int
    spent_nano: int


@dataclass(frozen=True, slots=True)
class Settled:
    alerts: list[Alert]
    stale: bool  # the reservation was made in a budget the caller did not name


def _alert_keys(budgets: Sequence[Budget], at: datetime, keys: list[str],
                args: list[Any]) -> None:
    for b in budgets:
        keys += [counter_key("s", b, at), counter_key("a", b, at)]
        args += [to_nano(b.limit_usd), ",".join(str(level) for level in b.levels())]


def _alerts(budgets: Sequence[Budget], result: Sequence[Any]) -> list[Alert]:
    return [Alert(budgets[int(result[i]) - 1], int(result[i + 1]), int(result[i + 2]))
            for i in range(0, len(result), 3)]


class BudgetLedger:
    """The Redis side: reserve (queued into the caller's pipeline, one round trip for all of
    admission), seed from the ledger, settle."""

    def __init__(self, client: redis.Redis, pool: asyncpg.Pool, *,
                 done_ttl_s: int = 2 * 86_400) -> None:
        self._redis = client
        self._pool = pool
        self._done_ttl_s = done_ttl_s
        self._reserve_sha = hashlib.sha1(_RESERVE_LUA.encode()).hexdigest()  # its name in Redis
        self._settle = client.register_script(_SETTLE_LUA)
        self._alerts = client.register_script(_ALERTS_LUA)

    def queue_reserve(self, pipe: Any, r: Reservation) -> None:
        """Queue the reservation's EVALSHA into `pipe` (`parse` reads its result)."""
        keys = [f"{_prefix(r.tenant_id)}:rz", f"{_prefix(r.tenant_id)}:rh"]
        args: list[Any] = [int(time.time() * 1000), r.request_id, r.deadline_ms,
                           str(r.amount_nano)]
        for b in r.budgets:
            keys += [counter_key("s", b, r.at), counter_key("r", b, r.at)]
            args += [to_nano(b.limit_usd) if b.hard else -1, _ttl_s(b, r.at)]
        pipe.evalsha(self._reserve_sha, len(keys), *keys, *args)

    @staticmethod
    def parse(r: Reservation, result: Any) -> Outcome:
        """The reservation's outcome from its pipeline result (raised Redis errors stay
        raised; a script unknown to Redis, after its restart, asks for `load_scripts`)."""
        if isinstance(result, NoScriptError):
            return Outcome("noscript")
        if isinstance(result, Exception):
            raise result
        tag = result[0].decode() if isinstance(result[0], bytes) else str(result[0])
        if tag == "over":
            return Outcome("over", budget=r.budgets[int(result[1]) - 1],
                           used_nano=int(result[2]))
        if tag == "seed":
            return Outcome("seed", missing=tuple(r.budgets[int(i) - 1] for i in result[1:]))
        return Outcome("ok")

    async def load_scripts(self) -> None:
        await self._redis.script_load(_RESERVE_LUA)

    async def seed(self, budgets: Sequence[Budget], at: datetime) -> None:
        """Each budget's spent counter from the ledger, unless another process set it first
        (SET NX). What the ledger lacks at that moment (usage still on its way to it, behind
        the usage worker) is not counted: the bound of a Redis restart."""
        for b in budgets:
            spent = await ledger_spend(self._pool, b, at)
            await self._redis.set(counter_key("s", b, at), to_nano(spent), nx=True,
                                  ex=_ttl_s(b, at))

    async def reserve(self, r: Reservation) -> Outcome:
        """Reserve on its own (one round trip; more only to seed counters or load the
        script): the router's batch path, and the ingress until admission is one pipeline."""
        for _ in range(3):
            pipe = self._redis.pipeline(transaction=False)
            self.queue_reserve(pipe, r)
            outcome = self.parse(r, (await pipe.execute(raise_on_error=False))[0])
            if outcome.kind == "seed":
                await self.seed(outcome.missing, r.at)
            elif outcome.kind == "noscript":
                await self.load_scripts()
            else:
                return outcome
        return Outcome("ok")  # seeded and loaded twice over: admit rather than loop

    async def settle(self, tenant_id: str, request_id: str, budgets: Sequence[Budget],
                     at: datetime, cost_nano: int) -> Settled:
        """Release the request's reservation and add its real cost (once per request id);
        the alert levels the spend of `budgets` reached for the first time."""
        keys = [f"{_prefix(tenant_id)}:rz", f"{_prefix(tenant_id)}:rh",
                f"{_prefix(tenant_id)}:done:{request_id}"]
        args: list[Any] = [request_id, str(cost_nano), self._done_ttl_s]
        _alert_keys(budgets, at, keys, args)
        result = await self._settle(keys=keys, args=args)
        return Settled(_alerts(budgets, result[1:]), stale=bool(int(result[0])))

    async def alerts(self, budgets: Sequence[Budget], at: datetime) -> list[Alert]:
        """The alert levels the spend of `budgets` reached for the first time, spending
        nothing: after a `settle` that found the caller's budgets `stale`."""
        keys: list[str] = []
        args: list[Any] = []
        _alert_keys(budgets, at, keys, args)
        return _alerts(budgets, await self._alerts(keys=keys, args=args)) if keys else []

    async def reserved(self, tenant_id: str, request_id: str) -> bool:
        """Whether the request holds a reservation (what an ingress's admission leaves)."""
        return bool(await self._redis.hexists(f"{_prefix(tenant_id)}:rh", request_id))

    async def spent_nano(self, budget: Budget, at: datetime) -> int | None:
        """Spent + reserved in the budget's current period (None: not counted in Redis)."""
        spent, reserved = await self._redis.mget(counter_key("s", budget, at),
                                                 counter_key("r", budget, at))
        if spent is None:
            return None
        return int(spent) + int(reserved or 0)

    async def forget(self, budget: Budget, at: datetime) -> None:
        """Drop the budget's current counters (after its change): the next admission seeds
        them from the ledger again, so no spend settled meanwhile is lost."""
        await self._redis.delete(counter_key("s", budget, at), counter_key("a", budget, at))


@dataclass(frozen=True, slots=True)
class BudgetTicket:
    """A reservation as one ticket of the ingress's admission pipeline (`ingress/admission.py`,
    `state/limits.py` `run_tickets`): its script rides the same round trip as the rate
    limits'."""

    ledger: BudgetLedger
    reservation: Reservation
    sources: tuple[str, ...] = (_RESERVE_LUA,)

    def queue(self, pipe: Any) -> None:
        self.ledger.queue_reserve(pipe, self.reservation)

    def parse(self, result: Any) -> Outcome:
        return BudgetLedger.parse(self.reservation, result)


def arrival(received_at_ms: int) -> datetime:
    return datetime.fromtimestamp(received_at_ms / 1000, tz=UTC)
