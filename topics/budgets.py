"""Spend budgets: what a budget is, which ones apply to a request, its periods (UTC) and the
worst-case cost a request reserves at admission.

The other files of the feature: `state/migrations/010_budgets.sql` and `state/budgets.py`
(the budgets in PostgreSQL; the Redis scripts that reserve and settle spend atomically),
`ingress/budgets.py` (admission on the ingress; the admin API), `workers/router/budgets.py`
(the batch path's admission, settlement to the real cost, alerts). docs/budgets.md says it
in prose.

Money in Redis is in integer nano-dollars (1e-9 USD, `to_nano`): every cost the catalog can
produce (a price per million tokens with up to 3 decimals, times whole tokens) is a whole
number of them, so counters add exactly; Lua's doubles hold integers exactly up to 2^53
nano-dollars, about $9 million per budget period, far above any budget we store
(numeric(20,6) is refused above `MAX_BUDGET_USD`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import ROUND_CEILING, Decimal
from typing import Any, Literal

import orjson

from topics.catalog import Catalog, Model
from topics.errors import BudgetExceeded

Scope = Literal["tenant", "key"]
Period = Literal["day", "month"]
PERIODS: tuple[Period, ...] = ("day", "month")
NANO = Decimal(1_000_000_000)
MAX_BUDGET_USD = Decimal(1_000_000)
# Alert levels, percent of a budget: each fires once per budget period (the seed's 75, 90
# and 100; a budget's own `alert_threshold` adds one).
ALERT_LEVELS: tuple[int, ...] = (75, 90, 100)
# Output tokens reserved for a request that sets no `max_tokens`: about a long answer. Its
# real cost settles the reservation when the answer is in; only a concurrent burst of such
# requests can be refused early because of it.
DEFAULT_MAX_TOKENS = 4096
CHARS_PER_TOKEN = 4  # the prompt estimate: about 4 characters a token (English)


@dataclass(frozen=True, slots=True)
class Budget:
    """One spend limit: a tenant's (key_id None) or one key's, per UTC day or month."""

    tenant_id: str
    key_id: str | None
    period: Period
    limit_usd: Decimal
    hard: bool  # refuse (402) at the limit; soft: serve and alert
    alert_threshold_pct: int | None = None
    webhook_url: str | None = None
    fail_open: bool = False  # Redis unreachable at admission: admit (True) or refuse (503)

    @property
    def scope(self) -> Scope:
        return "tenant" if self.key_id is None else "key"

    @property
    def name(self) -> str:
        """`tenant.month`, `key.day`, …: how an alert and the metrics name the budget."""
        return f"{self.scope}.{self.period}"

    def levels(self) -> tuple[int, ...]:
        extra = (self.alert_threshold_pct,) if self.alert_threshold_pct else ()
        return tuple(sorted({*ALERT_LEVELS, *extra}))

    def public(self) -> dict[str, Any]:
        return {"scope": self.scope, "key_id": self.key_id, "period": self.period,
                "limit_usd": orjson.Fragment(usd_text(self.limit_usd)),
                "hard_cap": self.hard, "alert_threshold": self.alert_threshold_pct,
                "webhook_url": self.webhook_url, "fail_open": self.fail_open}


def period_start(period: Period, at: datetime) -> datetime:
    at = at.astimezone(UTC)
    if period == "day":
        return at.replace(hour=0, minute=0, second=0, microsecond=0)
    return at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)


def reset_at(period: Period, at: datetime) -> datetime:
    """When the period holding `at` ends (the next one starts), UTC."""
    start = period_start(period, at)
    if period == "day":
        return start + timedelta(days=1)
    return (start + timedelta(days=32)).replace(day=1)


def period_tag(period: Period, at: datetime) -> str:
    """The period's name in Redis keys: `d20250131`, `m202501`."""
    at = at.astimezone(UTC)
    return at.strftime("d%Y%m%d") if period == "day" else at.strftime("m%Y%m")


def to_nano(usd: Decimal) -> int:
    """US dollars in whole nano-dollars, rounded up (a reservation never falls short)."""
    return int((usd * NANO).to_integral_value(rounding=ROUND_CEILING))


def from_nano(nano: int) -> Decimal:
    return Decimal(nano) / NANO


def usd_text(amount: Decimal) -> str:
    """Fixed-point digits without trailing zeros (as ingress/money.py writes money)."""
    text = format(amount, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def prompt_chars(body: dict[str, Any]) -> int:
    """The characters of a request's prompt: messages' text (parts included), or the
    embedding input. Images and tools count by their JSON size: an overestimate is safe."""
    if "messages" in body:
        return len(orjson.dumps(body.get("messages"))) + len(orjson.dumps(body.get("tools")))
    return len(orjson.dumps(body.get("input")))


def max_output_tokens(body: dict[str, Any]) -> int:
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return DEFAULT_MAX_TOKENS


def worst_case_usd(body: dict[str, Any], models: list[Model], attempts: int) -> Decimal:
    """What a request can cost at most, reserved at admission: the prompt estimate (about
    4 characters a token) at the input price plus `max_tokens` (else `DEFAULT_MAX_TOKENS`)
    at the output price, of the dearest model it may run on, times the attempts that can run
    at once (racing, hedging, a council and its judge each pay)."""
    if not models:
        return Decimal(0)
    prompt = -(-prompt_chars(body) // CHARS_PER_TOKEN)
    output = max_output_tokens(body) if "messages" in body else 0
    one = max(m.cost_usd(prompt, output, 0) for m in models)
    return one * max(attempts, 1)


def candidate_models(catalog: Catalog, body: dict[str, Any], kind: str) -> list[Model]:
    """The models a request may run on: its model's routes and its fallbacks; `auto`: every
    model of its kind (the router chooses)."""
    names = [str(body.get("model")), *(str(m) for m in body.get("models") or ())]
    found = [m for name in names for m in catalog.routes_of(name)]
    if found and str(body.get("model")) != "auto":
        return found
    return [m for m in catalog.models if m.kind == kind]


def parallel_attempts(routing: dict[str, Any], defaults: dict[str, int]) -> int:
    """The attempts a request can have running at once: 1, or the mode's routes (a council's
    members plus its judge). `defaults`: each mode's routes when the request says none."""
    mode = routing.get("mode")
    if mode not in ("speculative", "hedged", "council"):
        return 1
    routes = routing.get("routes") or defaults.get(str(mode), 1)
    return int(routes) + (1 if mode == "council" else 0)


def exceeded(budget: Budget, used_nano: int, at: datetime) -> BudgetExceeded:
    """The 402 for `budget`: used counts what is spent and reserved by requests in flight."""
    used = from_nano(used_nano)
    remaining = max(budget.limit_usd - used, Decimal(0))
    reset = reset_at(budget.period, at)
    return BudgetExceeded(
        f"the {budget.scope}'s {budget.period}ly budget of ${usd_text(budget.limit_usd)} "
        f"would be exceeded by this request; it resets at {reset.isoformat()}",
        details={"budget_used_usd": orjson.Fragment(usd_text(used)),
                 "budget_limit_usd": orjson.Fragment(usd_text(budget.limit_usd)),
                 "remaining_usd": orjson.Fragment(usd_text(remaining)),
                 "reset_at": reset.isoformat().replace("+00:00", "Z"),
                 "scope": budget.scope, "period": budget.period})
