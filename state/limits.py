"""Rate limits' storage (PostgreSQL) and enforcement (Redis). The policy: `topics/limits.py`.

Storage: table `rate_limits` (migration 009), one row per tenant (`key_id = ''`) and per key
with limits of its own; read in the tenant's scope (row-level security) and cached in each
process for `ttl_s` (`LimitStore`), dropped at once by the revocation broadcast (a change
publishes the tenant's `"tenant"` revocation, `ingress/limits.py`).

Enforcement: ONE Lua script per request (`ADMIT`), atomic in Redis and so shared by every
ingress and router: it prunes, checks every limit of the tenant and of the key, and only
if all allow, records the request in all of them (a refused request consumes nothing). Time
is Redis's own (`TIME`), so replicas' clocks do not matter. The script is queued onto a
caller's pipeline (`LimitTicket.queue`), so admission is one round trip together with the
budgets' script. Keys, per scope `{t:<tenant>}` or `{k:<tenant>:<key>}`:

- `lim:<scope>:rps`: the GCRA's theoretical arrival time (ms);
- `lim:<scope>:rpm`: sorted set of the last minute's admitted request ids by time (ms);
- `lim:<scope>:tpm`: hash {lvl, ts}: the token bucket's level at ts;
- `lim:<scope>:conc`: sorted set of requests in flight by their deadline (ms); members past
  their deadline are pruned by the next admission, so a dead request's slot comes back;
- `lim:res:<request id>`: the request's reservation (its tokens and concurrency slots),
  until `SETTLE` applies the real usage, once (it deletes the reservation).

The scripts read keys named in the reservation (not declared in KEYS): one Redis, not a
Redis Cluster.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import asyncpg
import redis.asyncio as redis
from redis.exceptions import NoScriptError

from state.cache import ReadThroughCache
from state.tenancy import Connection, platform_scope, tenant_scope
from topics.limits import POLICY_FIELDS, LimitPolicy, Limits, Verdict, tier_policy
from topics.tenants import Tier

ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rid, deadline, est = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local refused, retry = '', 0
local function refuse(name, ms)
  if ms > retry or refused == '' then refused = name; retry = ms end
end
local lim_req, rem_req, reset_req, lim_tok, rem_tok, reset_tok = 0, -1, 0, 0, -1, 0
local plan = {}
for s = 0, 1 do
  local a = 3 + s * 5
  local rps, burst, rpm = tonumber(ARGV[a+1]), tonumber(ARGV[a+2]), tonumber(ARGV[a+3])
  local tpm, conc = tonumber(ARGV[a+4]), tonumber(ARGV[a+5])
  local k = s * 4
  local p = {}
  if rps > 0 then
    local step = 1000 / rps
    local tat = tonumber(redis.call('GET', KEYS[k+1]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + step
    local allow_at = new_tat - math.max(burst, 1) * step
    if allow_at > now then refuse('requests_per_second', allow_at - now)
    else p.tat = new_tat end
  end
  if rpm > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k+2], '-inf', now - 60000)
    local count = redis.call('ZCARD', KEYS[k+2])
    local oldest = redis.call('ZRANGE', KEYS[k+2], 0, 0, 'WITHSCORES')
    local first = now
    if oldest[2] then first = tonumber(oldest[2]) end
    if count >= rpm then refuse('requests_per_minute', first + 60000 - now)
    else p.rpm = true end
    local rem = rpm - count - 1
    if rem < 0 then rem = 0 end
    if rem_req < 0 or rem < rem_req then
      lim_req = rpm; rem_req = rem; reset_req = first + 60000 - now
    end
  end
  if tpm > 0 then
    local b = redis.call('HMGET', KEYS[k+3], 'lvl', 'ts')
    local lvl, ts = tonumber(b[1] or tpm), tonumber(b[2] or now)
    lvl = math.min(tpm, lvl + (now - ts) * tpm / 60000)
    local need = math.min(est, tpm)
    if lvl < need then refuse('tokens_per_minute', (need - lvl) * 60000 / tpm)
    else p.lvl = lvl - need; p.need = need end
    local rem = math.max(0, math.floor(lvl - need))
    if rem_tok < 0 or rem < rem_tok then
      lim_tok = tpm; rem_tok = rem
      reset_tok = (tpm - math.max(0, lvl - need)) * 60000 / tpm
    end
  end
  if conc > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[k+4], '-inf', now)
    if redis.call('ZCARD', KEYS[k+4]) >= conc then refuse('concurrent_requests', 1000)
    else p.conc = true end
  end
  plan[s] = p
end
if refused ~= '' then
  return {0, refused, math.ceil(retry), lim_req, math.max(rem_req, 0), math.ceil(reset_req),
          lim_tok, math.max(rem_tok, 0), math.ceil(reset_tok)}
end
local res = KEYS[9]
local hold = math.max(deadline - now, 1000)
for s = 0, 1 do
  local p, k = plan[s], s * 4
  if p.tat then redis.call('SET', KEYS[k+1], p.tat, 'PX', math.ceil(p.tat - now) + 1000) end
  if p.rpm then
    redis.call('ZADD', KEYS[k+2], now, rid)
    redis.call('PEXPIRE', KEYS[k+2], 61000)
  end
  if p.lvl then
    redis.call('HSET', KEYS[k+3], 'lvl', p.lvl, 'ts', now)
    redis.call('PEXPIRE', KEYS[k+3], 120000)
    redis.call('HSET', res, 't' .. s, KEYS[k+3], 'r' .. s, p.need, 'c' .. s, ARGV[3 + s*5 + 4])
  end
  if p.conc then
    redis.call('ZADD', KEYS[k+4], deadline, rid)
    if redis.call('PTTL', KEYS[k+4]) < hold then redis.call('PEXPIRE', KEYS[k+4], hold) end
    redis.call('HSET', res, 'k' .. s, KEYS[k+4])
  end
end
-- Always written: it is also the proof that this request was admitted (the router checks
-- it for envelopes that say `admitted`, which a batch producer could forge).
redis.call('HSET', res, 'id', rid)
redis.call('PEXPIRE', res, hold + 60000)
return {1, '', 0, lim_req, math.max(rem_req, 0), math.ceil(reset_req),
        lim_tok, math.max(rem_tok, 0), math.ceil(reset_tok)}
"""

# KEYS[1]: the reservation; ARGV[1]: the tokens the request really used (prompt +
# completion, every attempt). Returns 1 if it settled, 0 if it had been already (or never
# reserved anything).
SETTLE_LUA = """
local r = redis.call('HGETALL', KEYS[1])
if #r == 0 then return 0 end
local h = {}
for i = 1, #r, 2 do h[r[i]] = r[i+1] end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local used = tonumber(ARGV[1])
for s = 0, 1 do
  local key = h['t' .. s]
  if key then
    local cap, need = tonumber(h['c' .. s]), tonumber(h['r' .. s])
    local b = redis.call('HMGET', key, 'lvl', 'ts')
    local lvl, ts = tonumber(b[1] or cap), tonumber(b[2] or now)
    lvl = math.min(cap, lvl + (now - ts) * cap / 60000)
    -- May go below zero: a request that used more than it reserved leaves a debt that the
    -- next requests wait out.
    lvl = math.min(cap, lvl + need - used)
    redis.call('HSET', key, 'lvl', lvl, 'ts', now)
    redis.call('PEXPIRE', key, 120000)
  end
  local conc = h['k' .. s]
  if conc then redis.call('ZREM', conc, h['id']) end
end
redis.call('DEL', KEYS[1])
return 1
"""

ADMIT_SHA = hashlib.sha1(ADMIT_LUA.encode()).hexdigest()
SETTLE_SHA = hashlib.sha1(SETTLE_LUA.encode()).hexdigest()


def _scope_keys(scope: str) -> list[str]:
    return [f"lim:{{{scope}}}:{part}" for part in ("rps", "rpm", "tpm", "conc")]


def reservation_key(request_id: str) -> str:
    return f"lim:res:{request_id}"


def _policy_args(policy: LimitPolicy) -> list[int]:
    return [policy.requests_per_second, policy.burst, policy.requests_per_minute,
            policy.tokens_per_minute, policy.concurrent_requests]


@dataclass(frozen=True, slots=True)
class LimitTicket:
    """One request's admission by the rate limits: queued on a pipeline, parsed after it."""

    tenant_id: str
    key_id: str
    request_id: str
    deadline_ms: int
    tokens: int
    limits: Limits
    sources: tuple[str, ...] = (ADMIT_LUA,)  # loaded again on NOSCRIPT

    def queue(self, pipe: Any) -> None:
        keys = [*_scope_keys(f"t:{self.tenant_id}"),
                *_scope_keys(f"k:{self.tenant_id}:{self.key_id}"),
                reservation_key(self.request_id)]
        args = [self.request_id, self.deadline_ms, self.tokens,
                *_policy_args(self.limits.tenant), *_policy_args(self.limits.key)]
        pipe.evalsha(ADMIT_SHA, len(keys), *keys, *args)

    @staticmethod
    def parse(result: Any) -> Verdict:
        if isinstance(result, BaseException):
            raise result
        ok, refused, retry, lim_r, rem_r, reset_r, lim_t, rem_t, reset_t = result
        name = refused.decode() if isinstance(refused, bytes) else str(refused)
        return Verdict(admitted=bool(ok), limit=name or None, retry_after_ms=int(retry),
                       limit_requests=int(lim_r), remaining_requests=int(rem_r),
                       reset_requests_ms=int(reset_r), limit_tokens=int(lim_t),
                       remaining_tokens=int(rem_t), reset_tokens_ms=int(reset_t))


async def run_tickets(client: redis.Redis, tickets: list[Any]) -> list[Any]:
    """Run every ticket's script in ONE pipeline (one round trip); results in order,
    errors as values. The scripts are loaded once and the pipeline run again only when
    Redis does not know one (a restarted Redis)."""
    for _ in range(2):
        pipe = client.pipeline(transaction=False)
        for ticket in tickets:
            ticket.queue(pipe)
        results: list[Any] = await pipe.execute(raise_on_error=False)
        if not any(isinstance(r, NoScriptError) for r in results):
            return results
        for ticket in tickets:
            for source in ticket.sources:
                await client.script_load(source)
    return results


async def settle(client: redis.Redis, request_id: str, used_tokens: int) -> bool:
    """Settle the request's token reservation to `used_tokens` and free its concurrency
    slots; once (a second call does nothing)."""
    key = reservation_key(request_id)
    try:
        done = await client.evalsha(SETTLE_SHA, 1, key, used_tokens)
    except NoScriptError:
        done = await client.eval(SETTLE_LUA, 1, key, used_tokens)
    return bool(done)


async def was_admitted(client: redis.Redis, request_id: str) -> bool:
    """Whether an admission holds a reservation for the request (until it is settled)."""
    return bool(await client.exists(reservation_key(request_id)))


# --- PostgreSQL: the overrides -----------------------------------------------------------

_COLUMNS = ", ".join(POLICY_FIELDS)


@dataclass(frozen=True, slots=True)
class StoredLimits:
    """A tenant's tier, its overrides and its keys' ones, as stored."""

    tier: Tier
    tenant: dict[str, int]  # overridden fields only
    keys: dict[str, dict[str, int]]
    fail_open: bool | None

    def effective(self, key_id: str, default_fail_open: bool) -> Limits:
        return Limits(tenant=tier_policy(self.tier).merged(self.tenant),
                      key=LimitPolicy().merged(self.keys.get(key_id, {})),
                      fail_open=default_fail_open if self.fail_open is None
                      else self.fail_open)


async def read_limits(pool: asyncpg.Pool, tenant_id: str) -> StoredLimits | None:
    """The tenant's tier and every override of it and its keys; None: no such tenant."""
    async with tenant_scope(pool, tenant_id) as conn:
        tier = await conn.fetchval("SELECT tier FROM tenants WHERE id = $1", tenant_id)
        if tier is None:
            return None
        rows = await conn.fetch(
            f"SELECT key_id, fail_open, {_COLUMNS} FROM rate_limits WHERE tenant_id = $1",
            tenant_id)
    tenant: dict[str, int] = {}
    keys: dict[str, dict[str, int]] = {}
    fail_open = None
    for row in rows:
        fields = {name: int(row[name]) for name in POLICY_FIELDS if row[name] is not None}
        if row["key_id"]:
            keys[row["key_id"]] = fields
        else:
            tenant, fail_open = fields, row["fail_open"]
    return StoredLimits(Tier(tier), tenant, keys, fail_open)


async def write_limits(pool: asyncpg.Pool, tenant_id: str, key_id: str,
                       values: dict[str, int | None], fail_open: bool | None,
                       set_fail_open: bool) -> None:
    """Set (or with None, clear) overrides of the tenant (`key_id=''`) or one of its keys;
    fields not in `values` stay as they are."""
    names = [name for name in POLICY_FIELDS if name in values]
    cols = [*names, *(["fail_open"] if set_fail_open else [])]
    vals: list[Any] = [values[name] for name in names] + ([fail_open] if set_fail_open else [])
    placeholders = ", ".join(f"${i + 3}" for i in range(len(cols)))
    updates = ", ".join(f"{c} = EXCLUDED.{c}" for c in cols)
    async with tenant_scope(pool, tenant_id) as conn:
        await conn.execute(
            f"INSERT INTO rate_limits (tenant_id, key_id{''.join(', ' + c for c in cols)})"
            f" VALUES ($1, $2{', ' if cols else ''}{placeholders})"
            f" ON CONFLICT (tenant_id, key_id) DO UPDATE SET updated_at = now()"
            f"{''.join(', ' + u for u in [updates] if u)}",
            tenant_id, key_id, *vals)


async def lift_limits(db: asyncpg.Pool | Connection, tenant_id: str) -> None:
    """As the owner role: make the tenant's limits unlimited (every field 0). For operators'
    own tenants: the test suite's shared tenant, the benchmarks' (which measure admission,
    not refusals)."""
    async with platform_scope(db) as conn:
        await conn.execute(
            f"INSERT INTO rate_limits (tenant_id, {_COLUMNS}) VALUES ($1, 0, 0, 0, 0, 0)"
            f" ON CONFLICT (tenant_id, key_id) DO UPDATE SET "
            + ", ".join(f"{name} = 0" for name in POLICY_FIELDS), tenant_id)


class LimitStore:
    """Each tenant's limits, read through a cache of `ttl_s`; a `Revocable` of
    `state/revocations.py`: a tenant's revocation (sent when its limits change) drops it."""

    def __init__(self, pool: asyncpg.Pool, *, ttl_s: float, default_fail_open: bool) -> None:
        async def load(tenant_id: str) -> StoredLimits | None:
            return await read_limits(pool, tenant_id)

        self._cache: ReadThroughCache[str, StoredLimits | None] = ReadThroughCache(
            load, ttl_s=ttl_s)
        self.default_fail_open = default_fail_open

    async def limits(self, tenant_id: str, key_id: str) -> Limits | None:
        stored = await self._cache.get(tenant_id)
        return None if stored is None else stored.effective(key_id, self.default_fail_open)

    def drop_key(self, key_id: str) -> None:
        pass  # a key's limits change with a tenant revocation

    def drop_tenant(self, tenant_id: str) -> None:
        self._cache.invalidate_where(lambda which: which == tenant_id)

    def drop_all(self) -> None:
        self._cache.clear()
