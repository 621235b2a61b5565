"""GET /v1/usage and GET /v1/usage/history: the caller's tenant's usage over a window, in the
seed product's shapes (/work/shared/SEED-API.md) — `{total_requests, total_tokens,
total_cost_usd, period}` and `{entries, period}` — with more beside them.

The window: `period` is `<n>d` (the last n UTC calendar days, today so far included), `<n>h`
(the last n hours) or `month` (this UTC calendar month so far); or explicit `start` (and
`end`, default now), RFC 3339 times or dates, which override `period` (then `"custom"`). A
date as `end` includes that day. Totals and history use the same windows, so a history's
entries add up to the total of the same query. The rows come from `state/usage_report.py`;
money is written by `ingress/money.py` (a JSON number with the exact digits, and the string).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from starlette.responses import Response

from ingress.bodies import json_response
from ingress.call import Call
from ingress.money import usd_fields
from state.budgets import ledger_spend
from state.usage_report import Counts, UsageRow, Window, usage_rows
from topics.budgets import Budget, from_nano, reset_at
from topics.errors import InvalidRequest
from topics.identity import Permission

USAGE_PERIOD = "month"  # GET /v1/usage without a window: this month so far (budgets are monthly)
HISTORY_PERIOD = "7d"  # GET /v1/usage/history without one: the last seven days
MAX_DAYS = 366  # the longest window: one query's rows stay few
GROUPS = ("day", "model", "provider")
_PERIOD = re.compile(r"([1-9][0-9]{0,4})([dh])")


async def usage(call: Call) -> Response:
    """Usage totals over a window (`period`=`month` by default, `7d`, `24h`, …; or
    `start`/`end`): `{total_requests, total_tokens, total_cost_usd, period}`, and more; the
    tenant's, or a member's own key's (`scope`)."""
    period, window = _window(call, USAGE_PERIOD)
    totals = Counts()
    scope, key_id = _scope(call)
    for row in await usage_rows(call.services.pool, call.principal.tenant_id, window, key_id):
        totals.add(row)
    return json_response({
        "object": "usage", "period": period, "scope": scope, **_bounds(window),
        "total_requests": totals.requests, "total_tokens": totals.total_tokens,
        **usd_fields("total_cost_usd", totals.cost_usd),
        "total_attempts": totals.attempts, "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens, "cached_tokens": totals.cached_tokens,
        **await _budgets(call)})


async def usage_history(call: Call) -> Response:
    """Usage over a window (`period`=`7d` by default, or `start`/`end`) as `{entries,
    period}`: by UTC day with each day's models and providers (`group_by=day`), or by `model`
    or `provider`; the tenant's, or a member's own key's (`scope`)."""
    period, window = _window(call, HISTORY_PERIOD)
    group_by = call.request.query_params.get("group_by") or "day"
    if group_by not in GROUPS:
        raise InvalidRequest(f"group_by must be one of {', '.join(GROUPS)}",
                             code="invalid_query", param="group_by")
    scope, key_id = _scope(call)
    rows = await usage_rows(call.services.pool, call.principal.tenant_id, window, key_id)
    entries = (_by_day(rows, window) if group_by == "day" else
               _grouped(rows, group_by, "provider" if group_by == "model" else "model"))
    return json_response({"object": "list", "period": period, "scope": scope,
                          **_bounds(window),
                          "group_by": group_by, "entries": entries})


async def _budgets(call: Call) -> dict[str, Any]:
    """The spend budgets that apply to the caller (its tenant's and its key's, docs/budgets.md),
    each with what is used of its current period (spent and reserved, as admission counts it)
    and what remains; the first one's figures also at the top level (`budget_used_usd`,
    `budget_limit_usd`, `remaining_usd`), the tenant's monthly budget when there is one.
    Nothing when no budget applies."""
    principal = call.principal
    service = call.services.budgets
    budgets = await service.cache.budgets(principal.tenant_id, principal.key_id)
    if not budgets:
        return {}
    now = datetime.now(UTC)
    views = []
    for budget in sorted(budgets, key=lambda b: (b.scope != "tenant", b.period != "month")):
        views.append(await _budget_view(call, budget, now))
    first = views[0]
    return {"budgets": views, **{name: first[name] for name in (
        "budget_used_usd", "budget_used_usd_exact", "budget_limit_usd",
        "budget_limit_usd_exact", "remaining_usd", "remaining_usd_exact")}}


async def _budget_view(call: Call, budget: Budget, now: datetime) -> dict[str, Any]:
    used_nano = await call.services.budgets.ledger.spent_nano(budget, now)
    used = from_nano(used_nano) if used_nano is not None else \
        await ledger_spend(call.services.pool, budget, now)  # not counted in Redis yet
    remaining = max(budget.limit_usd - used, Decimal(0))
    return {"scope": budget.scope, "key_id": budget.key_id, "period": budget.period,
            "hard_cap": budget.hard,
            **usd_fields("budget_used_usd", used),
            **usd_fields("budget_limit_usd", budget.limit_usd),
            **usd_fields("remaining_usd", remaining),
            "reset_at": _rfc3339(reset_at(budget.period, now))}


def _scope(call: Call) -> tuple[str, str | None]:
    """Whose usage the caller sees: the whole tenant's with `usage:read`, else (a member) its
    own key's only."""
    principal = call.principal
    if principal.can(Permission.USAGE_READ):
        return "tenant", None
    return "key", principal.key_id


def _counts(counts: Counts) -> dict[str, Any]:
    return {"requests": counts.requests, "attempts": counts.attempts,
            "prompt_tokens": counts.prompt_tokens,
            "completion_tokens": counts.completion_tokens,
            "cached_tokens": counts.cached_tokens, "total_tokens": counts.total_tokens,
            **usd_fields("cost_usd", counts.cost_usd)}


def _breakdown(rows: list[UsageRow], key: Callable[[UsageRow], tuple[str, ...]],
               names: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows summed by `key`, most expensive first (then by name)."""
    sums: dict[tuple[str, ...], Counts] = {}
    for row in rows:
        sums.setdefault(key(row), Counts()).add(row)
    ordered = sorted(sums.items(), key=lambda item: (-item[1].cost_usd, item[0]))
    return [{**dict(zip(names, k, strict=True)), **_counts(c)} for k, c in ordered]


def _by_day(rows: list[UsageRow], window: Window) -> list[dict[str, Any]]:
    """One entry per UTC day of the window, days without usage included (as zeros)."""
    by_day: dict[date, list[UsageRow]] = {}
    for row in rows:
        by_day.setdefault(row.day, []).append(row)
    entries = []
    for day in window.days():
        day_rows = by_day.get(day, [])
        totals = Counts()
        for row in day_rows:
            totals.add(row)
        entries.append({
            "date": day.isoformat(), **_counts(totals),
            # A model may be served by more than one provider: its rows stay apart.
            "models": _breakdown(day_rows, lambda r: (r.model, r.provider),
                                 ("model", "provider")),
            "providers": _breakdown(day_rows, lambda r: (r.provider,), ("provider",))})
    return entries


def _grouped(rows: list[UsageRow], by: str, then: str) -> list[dict[str, Any]]:
    """One entry per model (or provider) over the whole window, with its providers (or
    models) inside."""
    groups: dict[str, list[UsageRow]] = {}
    for row in rows:
        groups.setdefault(getattr(row, by), []).append(row)
    entries = []
    for entry in _breakdown(rows, lambda r: (getattr(r, by),), (by,)):
        inner = groups[entry[by]]
        entries.append({**entry, then + "s": _breakdown(
            inner, lambda r: (getattr(r, then),), (then,))})
    return entries


def _bounds(window: Window) -> dict[str, str]:
    return {"start": _rfc3339(window.start), "end": _rfc3339(window.end)}


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _window(call: Call, default_period: str) -> tuple[str, Window]:
    """(the period's name, the window) from the query; 400 `invalid_query` naming the
    parameter at fault."""
    query = call.request.query_params
    now = datetime.now(UTC)
    start_text, end_text = query.get("start"), query.get("end")
    if start_text is not None:
        start = _moment(start_text, "start", inclusive_day=False)
        end = now if end_text is None else _moment(end_text, "end", inclusive_day=True)
        if end <= start:
            raise InvalidRequest("end must be after start", code="invalid_query",
                                 param="end")
        name, window = "custom", Window(start, end)
    elif end_text is not None:
        raise InvalidRequest("end needs a start (or use period)", code="invalid_query",
                             param="end")
    else:
        name = query.get("period") or default_period
        window = _period(name, now)
    if window.end - window.start > timedelta(days=MAX_DAYS):
        raise InvalidRequest(f"a window is at most {MAX_DAYS} days", code="invalid_query",
                             param="start" if name == "custom" else "period")
    return name, window


def _period(name: str, now: datetime) -> Window:
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    if name == "month":
        return Window(today.replace(day=1), now)
    match = _PERIOD.fullmatch(name)
    if match is None:
        raise InvalidRequest(f"period {name[:32]!r} is not <n>d, <n>h or month (e.g. 7d, "
                             "30d, 24h)", code="invalid_query", param="period")
    n, unit = int(match[1]), match[2]
    if unit == "h":
        return Window(now - timedelta(hours=n), now)
    return Window(today - timedelta(days=n - 1), now)  # today so far is the nth day


def _moment(text: str, param: str, *, inclusive_day: bool) -> datetime:
    """An RFC 3339 time (an offset-less one is UTC), or a date: its midnight (UTC), or for an
    inclusive `end` the next midnight."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime(day.year, day.month, day.day, tzinfo=UTC)
            return moment + timedelta(days=1) if inclusive_day else moment
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidRequest(f"{param} must be an RFC 3339 time or a date (YYYY-MM-DD)",
                             code="invalid_query", param=param) from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
