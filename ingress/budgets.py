"""Spend budgets' admin API: `POST /v1/tenants/{id}/budget` (the seed's) and
`GET/PUT/DELETE /v1/tenants/{id}/budgets`.

The contract is `topics/budgets.py`; storage and the Redis scripts `state/budgets.py`; the
router's side (the batch path, settlement, alerts) `workers/router/budgets.py`; admission
(reserve the request's worst case, or 402 `budget_exceeded`) `ingress/admission.py`
`BudgetAdmission`, one Redis round trip with the rate limits.
"""

from __future__ import annotations

import logging
import time
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from ingress.keys import tenant_of
from ingress.validation import parse_body
from state.budgets import (
    arrival,
    load_budgets,
    put_budget,
)
from state.budgets import delete_budget as delete_budget_row
from topics.budgets import (
    MAX_BUDGET_USD,
    Budget,
    Period,
)
from topics.errors import NotFound

if TYPE_CHECKING:  # ingress/call.py imports ingress/services.py, which imports this module
    from ingress.call import Call

log = logging.getLogger(__name__)



# ---- The admin API -------------------------------------------------------------------------

class SeedBudget(BaseModel):
    """The seed's body: the tenant's monthly budget."""

    model_config = ConfigDict(extra="forbid")

    monthly_budget_usd: Decimal = Field(gt=0, le=MAX_BUDGET_USD, decimal_places=6)
    # Percent (1-100) or a fraction (0-1]: an alert level beside 75, 90 and 100.
    alert_threshold: Decimal | None = Field(default=None, gt=0, le=100)
    hard_cap: bool = True
    webhook_url: str | None = Field(default=None, max_length=2048,
                                    pattern=r"^https?://")
    fail_open: bool = False


class BudgetBody(BaseModel):
    """One budget of PUT /v1/tenants/{id}/budgets."""

    model_config = ConfigDict(extra="forbid")

    key_id: str | None = None  # None: the tenant's
    period: Period
    limit_usd: Decimal = Field(gt=0, le=MAX_BUDGET_USD, decimal_places=6)
    hard_cap: bool = True
    alert_threshold: Decimal | None = Field(default=None, gt=0, le=100)
    webhook_url: str | None = Field(default=None, max_length=2048, pattern=r"^https?://")
    fail_open: bool = False


def _threshold_pct(value: Decimal | None) -> int | None:
    if value is None:
        return None
    return int(value * 100) if value <= 1 else int(value)


async def _store(call: Call, budget: Budget) -> None:
    services = call.services
    await put_budget(services.pool, budget)
    services.budgets.cache.invalidate(budget.tenant_id)
    # Spend is counted again from the ledger under the new budget (nothing settled is lost).
    await services.budgets.ledger.forget(budget, arrival(int(time.time() * 1000)))
    await services.audit.record(call, "budget.updated", tenant_id=budget.tenant_id,
                                target=budget.name, details=orjson.loads(
                                    orjson.dumps(budget.public())))


def _json(value: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


async def set_budget(call: Call) -> Response:
    """Set a tenant's monthly budget (the seed's shape): `{monthly_budget_usd, alert_threshold,
    hard_cap, webhook_url?}`; audited `budget.updated`."""
    # Another tenant's id: 404 unless a platform administrator asks (as for its keys).
    tenant_id = await tenant_of(call)
    body = parse_body(SeedBudget, await call.request.body())
    budget = Budget(tenant_id=tenant_id, key_id=None, period="month",
                    limit_usd=body.monthly_budget_usd, hard=body.hard_cap,
                    alert_threshold_pct=_threshold_pct(body.alert_threshold),
                    webhook_url=body.webhook_url, fail_open=body.fail_open)
    await _store(call, budget)
    return _json({"tenant_id": tenant_id, "monthly_budget_usd":
                  orjson.Fragment(str(body.monthly_budget_usd.normalize())),
                  "alert_threshold": budget.alert_threshold_pct, "hard_cap": budget.hard,
                  "webhook_url": budget.webhook_url, "alert_levels": list(budget.levels())})


async def list_budgets(call: Call) -> Response:
    """A tenant's budgets (tenant and keys, day and month), with what each has used."""
    tenant_id = await tenant_of(call)
    at = arrival(int(time.time() * 1000))
    out = []
    for budget in await load_budgets(call.services.pool, tenant_id):
        used = await call.services.budgets.ledger.spent_nano(budget, at)
        out.append({**budget.public(), "used_usd": None if used is None else
                    orjson.Fragment(str(Decimal(used) / Decimal(10**9)))})
    return _json({"budgets": out})


async def put_budgets(call: Call) -> Response:
    """Set one budget: `{key_id?, period: day|month, limit_usd, hard_cap, alert_threshold?,
    webhook_url?, fail_open?}`; audited `budget.updated`."""
    tenant_id = await tenant_of(call)
    body = parse_body(BudgetBody, await call.request.body())
    budget = Budget(tenant_id=tenant_id, key_id=body.key_id, period=body.period,
                    limit_usd=body.limit_usd, hard=body.hard_cap,
                    alert_threshold_pct=_threshold_pct(body.alert_threshold),
                    webhook_url=body.webhook_url, fail_open=body.fail_open)
    await _store(call, budget)
    return _json(budget.public())


async def delete_budget(call: Call) -> Response:
    """Remove one budget (`?period=day|month&key_id=`); audited `budget.updated`."""
    tenant_id = await tenant_of(call)
    raw = call.request.query_params.get("period", "month")
    if raw not in ("day", "month"):
        raise NotFound("period must be day or month", code="not_found", param="period")
    period: Period = "day" if raw == "day" else "month"
    key_id = call.request.query_params.get("key_id") or None
    if not await delete_budget_row(call.services.pool, tenant_id, key_id, period):
        raise NotFound("no such budget", code="budget_not_found")
    call.services.budgets.cache.invalidate(tenant_id)
    await call.services.audit.record(call, "budget.updated", tenant_id=tenant_id,
                                     target=f"{'key' if key_id else 'tenant'}.{period}",
                                     details={"deleted": True, "key_id": key_id})
    return Response(status_code=204)
