"""The ingress application: one lifespan owns every resource of the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware

from ingress.admission import Admission, BudgetAdmission
from ingress.audit import AuditLog
from ingress.auth import Authenticator, SessionVerifier
from ingress.errors import on_http_exception, on_switchyard_error
from ingress.metrics import IngressMetrics
from ingress.middleware import RequestIdentity
from ingress.ops import model_listing, package_version
from ingress.pipeline import Pipeline
from ingress.replies import ReplyRouter
from ingress.response_cache import ResponseCache
from ingress.routes import ROUTES, metric_paths
from ingress.services import Services
from state.bandit import PosteriorStore
from state.breakers import BreakerConfig, Breakers
from state.budgets import BudgetCache, BudgetLedger
from state.keys import KeyRecord, find_key, key_status
from state.last_used import LastUsed
from state.limits import LimitStore
from state.revocations import RevocationListener
from state.runtime import Runtime, open_runtime
from state.sessions import RevokedTokens
from state.tenant_providers import TenantRouteCache
from state.vault import MasterKeys
from topics import names
from topics.catalog import load_catalog
from topics.errors import SwitchyardError
from topics.heap import settle_heap
from topics.sessions import SessionCodec
from topics.settings import Settings
from topics.tracing import Tracing, open_tracing

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    catalog = load_catalog(settings.catalog_path)
    # Malformed master keys fail the start; absent ones make the vault routes 503.
    master_keys = MasterKeys.from_settings(settings.vault)
    # The same for session signing keys: malformed fails the start, absent refuses logins.
    session_codec = SessionCodec.from_settings(settings.auth)
    metrics = IngressMetrics(CollectorRegistry(), process=True)
    version = package_version()

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        # Closed last: the spans of the requests served until the end are flushed.
        tracing = open_tracing("ingress", content=settings.trace_content)
        try:
            async with _serving(tracing) as state:
                yield state
        finally:
            tracing.close()

    @contextlib.asynccontextmanager
    async def _serving(tracing: Tracing) -> AsyncIterator[dict[str, Any]]:
        started_s = time.monotonic()
        async with open_runtime(settings) as runtime:
            replies = ReplyRouter(runtime.redis, names.reply_channel(uuid.uuid4().hex),
                                  check_s=settings.redis.reply_check_s,
                                  answer_s=settings.redis.socket_timeout_s, metrics=metrics)
            subscribed = asyncio.Event()
            reader = asyncio.create_task(replies.run(subscribed))
            runtime.on_close(_cancel, reader)
            await asyncio.wait_for(subscribed.wait(), timeout=10)
            pool = runtime.pool

            async def lookup(key: str) -> KeyRecord | None:
                return await find_key(pool, key)

            last_used = LastUsed()
            sessions = None if session_codec is None else _sessions(runtime, session_codec,
                                                                    settings)
            auth = Authenticator(lookup, ttl_s=settings.ingress.auth_cache_ttl_s,
                                 negative_ttl_s=settings.ingress.auth_negative_cache_ttl_s,
                                 last_used=last_used, sessions=sessions)
            # Closes run in reverse: the periodic flusher stops, then one last flush.
            runtime.on_close(last_used.flush, pool, name="last_used_at flush", quiet=True)
            _background(runtime, last_used.run(pool, settings.ingress.last_used_flush_s))
            # Revocations reach this process's caches at once (state/revocations.py); the
            # revoked session tokens are loaded before the first request is served.
            limit_store = LimitStore(pool, ttl_s=settings.limits.cache_ttl_s,
                                     default_fail_open=settings.limits.fail_open) \
                if settings.limits.enabled else None
            tenant_routes = TenantRouteCache(pool, catalog,
                                             ttl_s=settings.router.policy_cache_ttl_s)
            revocations = RevocationListener(
                runtime.redis, [auth, tenant_routes] if limit_store is None
                else [auth, limit_store, tenant_routes],
                on_token=None if sessions is None else sessions.revoked.add,
                check_s=settings.redis.revocation_check_s,
                answer_s=settings.redis.socket_timeout_s)
            listening = asyncio.Event()
            _background(runtime, revocations.run(listening))
            await asyncio.wait_for(listening.wait(), timeout=10)
            router = settings.router
            budgets = BudgetAdmission(
                BudgetCache(pool, ttl_s=settings.ingress.budget_cache_ttl_s),
                BudgetLedger(runtime.redis, pool), catalog,
                {"speculative": router.race_routes, "hedged": router.hedge_routes,
                 "council": router.council_members})
            services = Services(
                admission=Admission(runtime.redis, limit_store, metrics, budgets),
                limits=limit_store,
                settings=settings, catalog=catalog, auth=auth, sessions=sessions,
                pipeline=Pipeline(settings=settings.ingress, producer=runtime.producer,
                                  redis_client=runtime.redis, replies=replies, metrics=metrics,
                                  max_message_bytes=settings.kafka.max_message_bytes,
                                  tracing=tracing),
                replies=replies,
                metrics=metrics, producer=runtime.producer, redis=runtime.redis, pool=pool,
                posteriors=PosteriorStore(runtime.redis, half_life_s=router.bandit_half_life_s),
                breakers=Breakers(runtime.redis, BreakerConfig.from_settings(router)),
                master_keys=master_keys, model_listing=model_listing(catalog),
                version=version, started_s=started_s,
                audit=AuditLog(runtime.producer,
                               publish_timeout_s=settings.audit.publish_timeout_s,
                               registry=metrics.registry),
                budgets=budgets, tenant_routes=tenant_routes,
                response_cache=ResponseCache(settings.cache, runtime.redis, runtime.producer,
                                             pool, metrics.registry)
                if settings.cache.enabled else None)
            settle_heap()
            log.info("ingress ready; replies on %s", replies.channel)
            # `tracing` for ingress/middleware.py, which runs outside any route.
            yield {"services": services, "tracing": tracing}

    return Starlette(
        routes=[endpoint.route() for endpoint in ROUTES],
        middleware=[Middleware(RequestIdentity, metrics=metrics, routes=metric_paths())],
        exception_handlers={SwitchyardError: on_switchyard_error,
                            HTTPException: on_http_exception},
        lifespan=lifespan,
    )


def _background(runtime: Runtime, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until the runtime closes."""
    runtime.on_close(_cancel, asyncio.create_task(work))


def _sessions(runtime: Runtime, codec: SessionCodec, settings: Settings) -> SessionVerifier:
    """The session verifier: its revoked tokens are fed by the revocation listener."""
    pool = runtime.pool

    async def lookup_by_id(key: tuple[str, str]) -> KeyRecord | None:
        tenant_id, key_id = key
        return await key_status(pool, tenant_id, key_id)

    return SessionVerifier(codec, RevokedTokens(), lookup_by_id,
                           ttl_s=settings.ingress.auth_cache_ttl_s,
                           negative_ttl_s=settings.ingress.auth_negative_cache_ttl_s)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
