"""Tenants' tiers and the limits each tier gives a new tenant by default.

The tiers are the seed product's (`SEED-API.md`, "Tenants, keys and budgets"). This module
only states them: `state/tenants.py` stores a tenant's tier (and its own monthly budget, when
it has one), `ingress/tenants.py` serves them on the admin API, and the enforcement of the
limits (issue 18) reads them from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from enum import StrEnum
from typing import Any


class Tier(StrEnum):
    TRIAL = "trial"
    GROWTH = "growth"
    SCALE = "scale"


# A tenant created through the admin API without a tier: the smallest limits, until a
# platform administrator says otherwise.
DEFAULT_TIER = Tier.TRIAL


@dataclass(frozen=True, slots=True)
class TierLimits:
    requests_per_second: int
    requests_per_minute: int
    burst: int
    concurrent_requests: int
    # None: no monthly budget unless the tenant has its own.
    monthly_budget_usd: Decimal | None = None
    budget_hard_cap: bool = False  # refuse (402) at the budget rather than only alert

    def public(self, monthly_budget_usd: Decimal | None = None) -> dict[str, Any]:
        """The JSON shape (`limits` of a tenant): numbers. `monthly_budget_usd`: the
        tenant's own budget, which replaces the tier's."""
        budget = monthly_budget_usd if monthly_budget_usd is not None \
            else self.monthly_budget_usd
        return {"requests_per_second": self.requests_per_second,
                "requests_per_minute": self.requests_per_minute,
                "burst": self.burst,
                "concurrent_requests": self.concurrent_requests,
                # A JSON number, as the seed SDKs decode it; budgets have at most 6 decimal
                # places, which a float's shortest representation keeps exactly.
                "monthly_budget_usd": None if budget is None else float(budget),
                "budget_hard_cap": self.budget_hard_cap}


TIER_LIMITS: dict[Tier, TierLimits] = {
    Tier.TRIAL: TierLimits(requests_per_second=10, requests_per_minute=300, burst=20,
                           concurrent_requests=5, monthly_budget_usd=Decimal("10"),
                           budget_hard_cap=True),
    Tier.GROWTH: TierLimits(requests_per_second=50, requests_per_minute=1_500, burst=100,
                            concurrent_requests=50),
    Tier.SCALE: TierLimits(requests_per_second=1_000, requests_per_minute=60_000, burst=2_000,
                           concurrent_requests=1_000),
}
