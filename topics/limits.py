"""Rate limits: what a tenant and each of its keys may send, and how the answer is told.

A limit policy has four dimensions, each 0 for "no limit":

- `requests_per_second` with a `burst`: a GCRA (a token bucket expressed as one timestamp)
  that lets `burst` requests through at once and then `requests_per_second` steadily;
- `requests_per_minute`: a sliding window over the last 60 s (a log of the admitted
  requests' times), exact at any instant, never 2x at a minute's edge;
- `tokens_per_minute` (prompt + completion): a token bucket of that size refilled
  continuously; each request reserves an estimate (`estimate_tokens`) at admission and the
  router settles it to the provider's reported usage when the request ends;
- `concurrent_requests`: requests in flight, each until it ends or, if nobody says it
  ended (a request whose process died), until its deadline.

A tenant's policy is its tier's (`TIER_LIMITS` of `topics/tenants.py`, with
`TIER_TOKENS_PER_MINUTE` here) with its own overrides; a key has no limits of its own
unless some are set, and is then held to both its own and its tenant's. Overrides are
stored by `state/limits.py` (PostgreSQL) and enforced there (Redis, one atomic script per
request); `ingress/admission.py` admits HTTP requests, `workers/router/limits.py` the batch
path, `ingress/limits.py` serves `GET/PUT /v1/tenants/{tenant_id}/limits`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from topics.errors import RateLimited
from topics.tenants import TIER_LIMITS, Tier

# The tokens a tier allows per minute: the seed names none; these are ours (docs/limits.md).
TIER_TOKENS_PER_MINUTE: dict[Tier, int] = {
    Tier.TRIAL: 100_000, Tier.GROWTH: 2_000_000, Tier.SCALE: 50_000_000}

# What a request without `max_tokens` (nor `max_completion_tokens`) reserves for its answer.
DEFAULT_COMPLETION_TOKENS = 1024
CHARS_PER_TOKEN = 4  # the usual rough rule for English text and JSON

LIMIT_NAMES = ("requests_per_second", "requests_per_minute", "tokens_per_minute",
               "concurrent_requests")


@dataclass(frozen=True, slots=True)
class LimitPolicy:
    """One scope's limits (a tenant's or a key's); 0: not limited."""

    requests_per_second: int = 0
    burst: int = 0
    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    concurrent_requests: int = 0

    def merged(self, overrides: dict[str, int]) -> LimitPolicy:
        return replace(self, **{k: v for k, v in overrides.items() if k in POLICY_FIELDS})

    def public(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in POLICY_FIELDS}

    @property
    def any(self) -> bool:
        return any(getattr(self, name) for name in POLICY_FIELDS)

    def within(self, ceiling: LimitPolicy) -> list[str]:
        """The fields that exceed `ceiling` (0 counts as unlimited on both sides)."""
        return [name for name in POLICY_FIELDS
                if getattr(ceiling, name) and (getattr(self, name) == 0
                                               or getattr(self, name) > getattr(ceiling, name))]


POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(LimitPolicy))


def tier_policy(tier: Tier) -> LimitPolicy:
    limits = TIER_LIMITS[tier]
    return LimitPolicy(requests_per_second=limits.requests_per_second, burst=limits.burst,
                       requests_per_minute=limits.requests_per_minute,
                       tokens_per_minute=TIER_TOKENS_PER_MINUTE[tier],
                       concurrent_requests=limits.concurrent_requests)


@dataclass(frozen=True, slots=True)
class Limits:
    """What admission needs for one request: the tenant's and the key's policies."""

    tenant: LimitPolicy
    key: LimitPolicy
    # Redis unreachable at admission: serve anyway (True, logged and counted) or refuse
    # with 503 `limits_unavailable` (False).
    fail_open: bool = True


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """A request's prompt at about four characters a token: its `messages` (an embedding's
    `input`), as admission counts them (`estimate_tokens`); also what the Messages ingress's
    `count_tokens` answers (`ingress/messages.py`)."""
    prompt = body.get("messages", body.get("input", ""))
    chars = len(prompt) if isinstance(prompt, str) else len(repr(prompt))
    return max(1, chars // CHARS_PER_TOKEN)


def estimate_tokens(body: dict[str, Any]) -> int:
    """The tokens a request reserves at admission: its prompt at about four characters a
    token (`messages`, or an embedding's `input`) plus what its answer may take
    (`max_completion_tokens`, `max_tokens`, else `DEFAULT_COMPLETION_TOKENS`; 0 for
    embeddings)."""
    prompt_tokens = estimate_prompt_tokens(body)
    if "messages" not in body:
        return prompt_tokens  # an embedding: no completion
    answer = body.get("max_completion_tokens", body.get("max_tokens"))
    completion = answer if isinstance(answer, int) and answer > 0 \
        else DEFAULT_COMPLETION_TOKENS
    n = body.get("n")
    return prompt_tokens + completion * (n if isinstance(n, int) and n > 0 else 1)


@dataclass(frozen=True, slots=True)
class Verdict:
    """The admission's answer, and what the rate-limit headers say."""

    admitted: bool
    limit: str | None  # the limit that refused, one of LIMIT_NAMES
    retry_after_ms: int
    limit_requests: int  # the requests-per-minute limit in force (0: none)
    remaining_requests: int
    reset_requests_ms: int  # until the window has room for one more request
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_ms: int  # until the token bucket is full again

    def headers(self, now_s: float) -> dict[str, str]:
        """OpenAI's `x-ratelimit-*` pairs and the seed's `X-RateLimit-*` (reset in unix
        seconds). Nothing when no limit is in force."""
        out: dict[str, str] = {}
        if self.limit_requests:
            out |= {"x-ratelimit-limit-requests": str(self.limit_requests),
                    "x-ratelimit-remaining-requests": str(self.remaining_requests),
                    "x-ratelimit-reset-requests": duration(self.reset_requests_ms),
                    "X-RateLimit-Limit": str(self.limit_requests),
                    "X-RateLimit-Remaining": str(self.remaining_requests),
                    "X-RateLimit-Reset": str(int(now_s + self.reset_requests_ms / 1000)
                                             + (1 if self.reset_requests_ms % 1000 else 0))}
        if self.limit_tokens:
            out |= {"x-ratelimit-limit-tokens": str(self.limit_tokens),
                    "x-ratelimit-remaining-tokens": str(self.remaining_tokens),
                    "x-ratelimit-reset-tokens": duration(self.reset_tokens_ms)}
        return out


def duration(ms: int) -> str:
    """OpenAI's format of a reset time: "1s", "6m0s", "1h2m3s", "20ms"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    seconds = -(-ms // 1000)  # rounded up: never earlier than the truth
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def refusal(limit: str, retry_after_ms: int) -> RateLimited:
    """The 429 of a refused request, the same at the ingress and on the batch path."""
    return RateLimited(f"rate limit exceeded: {limit.replace('_', ' ')}; retry after "
                       f"{max(retry_after_ms, 1) / 1000:.3g} s",
                       code="rate_limit_exceeded", param=limit,
                       retry_after_s=max(retry_after_ms, 1) / 1000)
