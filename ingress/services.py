"""What the ingress's handlers share: built once by the lifespan in `ingress/app.py` from the
process's runtime (`state/runtime.py`), handed to every handler as `Call.services`
(`ingress/call.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer

from ingress.admission import Admission, BudgetAdmission
from ingress.audit import AuditLog
from ingress.auth import Authenticator, SessionVerifier
from ingress.metrics import IngressMetrics
from ingress.pipeline import Pipeline
from ingress.replies import ReplyRouter
from ingress.response_cache import ResponseCache
from state.bandit import PosteriorStore
from state.breakers import Breakers
from state.limits import LimitStore
from state.tenant_providers import TenantRouteCache
from state.vault import MasterKeys
from topics.catalog import Catalog
from topics.settings import Settings


@dataclass(frozen=True, slots=True)
class Services:
    settings: Settings
    catalog: Catalog
    auth: Authenticator
    # None: no session signing key configured; login answers 503 (`ingress/sessions.py`).
    sessions: SessionVerifier | None
    pipeline: Pipeline
    replies: ReplyRouter  # this process's reply channel: `/readyz` checks its subscription
    metrics: IngressMetrics
    producer: AIOKafkaProducer
    redis: redis.Redis
    pool: asyncpg.Pool
    posteriors: PosteriorStore
    breakers: Breakers
    # None: no master key configured; every vault route answers 503.
    master_keys: MasterKeys | None
    model_listing: bytes  # GET /v1/models, the same for every caller (`ingress/ops.py`)
    version: str  # of the installed package, for GET /v1/health
    started_s: float  # time.monotonic() when the lifespan began: GET /v1/health's uptime
    # Every security- or money-relevant action records itself here before it answers.
    audit: AuditLog
    # Rate limits (and, with them, any admitter) before a request is queued.
    admission: Admission
    limits: LimitStore | None  # None: `limits.enabled` is off
    # Spend budgets: admission (reserve or 402) and the admin API's caches (`ingress/budgets.py`).
    budgets: BudgetAdmission
    # Each tenant's catalog with its registered providers' routes (`ingress/tenant_providers.py`).
    tenant_routes: TenantRouteCache
    # None: `cache.enabled` is off (`ingress/response_cache.py`).
    response_cache: ResponseCache | None = None
