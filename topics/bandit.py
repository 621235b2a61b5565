"""The bandit's maths: objective weights, reward, update weights and decay. Pure (no I/O, no
numpy: the ingress, which weighs feedback with it, never loads numpy).

The other files of the feature: `state/bandit.py` stores the posteriors in Redis (its Lua
scripts do the arithmetic of `decay` and take the weights of `outcome_weight` /
`feedback_weight`); `workers/router/decide.py` is where routing uses them (a draw over the
stored posteriors chooses the route, each attempt's `reward` updates them). The ingress's
feedback route (`ingress/insights.py`) weighs a quality score with `feedback_weight`, and
`bench/simulate.py` runs this same code against simulated providers. The draw itself,
`ThompsonSampler`, is the router's: `workers/router/sampler.py`.

Arms are routes eligible for a request, per prompt category. Each arm has a Beta(alpha, beta)
posterior over its expected reward in [0, 1]. An outcome with reward r adds w * r to alpha and
w * (1 - r) to beta, w its weight in requests (`outcome_weight`; a late quality score adds the
rest, `feedback_weight`). Between updates the posterior decays toward the prior with a
half-life, so old evidence fades: a provider that degrades is left after a few seconds of bad
outcomes, and one that was left drifts back toward the uncertain prior, gets tried again, and
is taken back when it has recovered. tests/test_bandit.py checks that the store's Lua decays
exactly like `decay` (to 1e-9).

The stored posterior counts each request once. The draw sharpens it: an arm's evidence
beyond the prior counts EVIDENCE times (`workers/router/sampler.py`). A Beta posterior fed
fractional rewards treats each request as one coin flip, but a composite reward is far less
noisy than a coin, so the literal posterior is far too wide; with a half-life of seconds it
never holds enough requests to tell routes a few points apart, and it keeps exploring bad
ones. The defaults below come from `python -m bench.simulate` (bench/RESULTS.md) at ~10
requests/s. How fast a degraded provider is left, in seconds, depends on the half-life and
the provider's latency, not on traffic; a busier gateway gathers more evidence per half-life
and can afford a shorter one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

HALF_LIFE_S = 8.0  # evidence halves every 8 s: a degraded provider is left within seconds
EVIDENCE = 128.0  # how much sharper the draw is than the literal posterior
PRIOR = (1.0, 2.0)  # mildly pessimistic: an arm we know nothing about is tried now and then
# One late quality score never counts for more than this many requests, however rarely answers
# are scored (see `feedback_weight`): a single noisy score must not swamp the posterior.
MAX_FEEDBACK_WEIGHT = 4.0


class ObjectiveWeights(BaseModel):
    """How much cost, latency and quality count in a route's reward, relative to each other.

    The one type for them everywhere: a request's own (`topics.messages.RoutingOptions`, e.g.
    from the seed `policy.optimize_for` presets), a tenant's routing policy
    (`topics.routing_policy.RoutingPolicy.weights`, which also refuses all zeros and anything
    but finite JSON numbers), and the router's decision. As a request field it accepts what
    producers have always sent, all zeros included (`reward` then counts success alone)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cost: float = Field(default=1.0, ge=0)
    latency: float = Field(default=1.0, ge=0)
    quality: float = Field(default=1.0, ge=0)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one attempt on a route produced."""

    success: bool
    latency_ms: float
    slo_ms: float  # the route's latency objective
    cost_usd: float
    cheapest_cost_usd: float  # the cheapest eligible route's cost for the same request
    quality: float | None = None  # in [0, 1], when known at outcome time


def latency_score(latency_ms: float, slo_ms: float) -> float:
    """1 at or under the SLO, then halves for every further SLO's worth of latency."""
    if slo_ms <= 0 or latency_ms <= slo_ms:
        return 1.0
    return float(0.5 ** ((latency_ms - slo_ms) / slo_ms))


def cost_score(cost_usd: float, cheapest_cost_usd: float) -> float:
    """1 for the cheapest eligible route, cheapest / cost for a dearer one."""
    if cost_usd <= cheapest_cost_usd or cost_usd <= 0:
        return 1.0
    return max(cheapest_cost_usd, 0.0) / cost_usd


def reward(outcome: Outcome, weights: ObjectiveWeights) -> float:
    """The reward of one attempt, in [0, 1].

    0 if the attempt failed. Otherwise the weighted mean

        (w_lat * L + w_cost * C + w_q * Q) / (w_lat + w_cost + w_q)

    where L = 1 if latency <= slo else 0.5 ** ((latency - slo) / slo) (1 at the SLO, 0.5 at
    twice the SLO, 0.25 at three times), C = 1 for the cheapest eligible route and
    cheapest / cost otherwise, and Q = quality in [0, 1]. A term whose value is unknown
    (quality not scored yet) drops out of both sums. If no term is left (every weight of the
    known terms is 0), success alone counts: the reward is 1.
    """
    if not outcome.success:
        return 0.0
    num = weights.latency * latency_score(outcome.latency_ms, outcome.slo_ms)
    num += weights.cost * cost_score(outcome.cost_usd, outcome.cheapest_cost_usd)
    den = weights.latency + weights.cost
    if outcome.quality is not None:
        num += weights.quality * min(max(outcome.quality, 0.0), 1.0)
        den += weights.quality
    return 1.0 if den <= 0 else min(max(num / den, 0.0), 1.0)


def quality_share(weights: ObjectiveWeights) -> float:
    """The quality weight's share of all weights, w_q / (w_lat + w_cost + w_q)."""
    total = weights.latency + weights.cost + weights.quality
    return weights.quality / total if total > 0 else 0.0


def outcome_weight(outcome: Outcome, weights: ObjectiveWeights, feedback_rate: float) -> float:
    """How many pseudo-observations an outcome update counts for (the store's `weight`).

    Every request is worth one observation in total, however its reward arrives. A success
    scored without quality, when quality scores come later for a fraction `feedback_rate` of
    answers, counts for 1 - quality_share; the rest comes with its score (`feedback_weight`).
    Then, in expectation, the posterior mean is exactly the mean of `reward` with quality
    known. A failure counts fully at once: it has no answer, so its quality is known (0). An
    outcome scored with quality, or when no feedback is collected (`feedback_rate` 0), counts 1.
    """
    if not outcome.success or outcome.quality is not None or feedback_rate <= 0:
        return 1.0
    return 1.0 - quality_share(weights)


def feedback_weight(weights: ObjectiveWeights, feedback_rate: float) -> float:
    """How many pseudo-observations a late quality score counts for: quality_share /
    feedback_rate (a judge that scores 10 % of answers speaks for ten answers per score),
    capped at MAX_FEEDBACK_WEIGHT. The store then adds weight * q to alpha and
    weight * (1 - q) to beta. 0 when no feedback is collected."""
    if feedback_rate <= 0:
        return 0.0
    return min(quality_share(weights) / min(feedback_rate, 1.0), MAX_FEEDBACK_WEIGHT)


def decay(alpha: float, beta: float, prior_alpha: float, prior_beta: float, elapsed_s: float,
          half_life_s: float) -> tuple[float, float]:
    """Pull (alpha, beta) toward the prior: the excess over the prior halves every half-life.

    factor = 0.5 ** (elapsed_s / half_life_s); x' = prior + (x - prior) * factor. No time
    elapsed (or a clock that went backwards) changes nothing; an infinite half-life never
    decays. The Lua scripts in state/bandit.py do the same operations in the same order.
    """
    if elapsed_s <= 0 or math.isinf(half_life_s):
        return alpha, beta
    factor = 0.5 ** (elapsed_s / half_life_s)
    return prior_alpha + (alpha - prior_alpha) * factor, prior_beta + (beta - prior_beta) * factor
