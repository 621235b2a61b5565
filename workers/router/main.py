"""The router process: owns its producer, consumer, Redis pool and HTTP pool, and closes them."""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import uuid

import aiohttp
import redis.asyncio as redis

from state.bandit import CachedPosteriors, PosteriorStore
from state.breakers import BreakerConfig, Breakers
from state.budgets import BudgetCache, BudgetLedger
from state.claims import Claims
from state.degraded import Degraded
from state.limits import LimitStore
from state.revocations import Revocable, RevocationListener
from state.routing_policy import PolicyCache
from state.runtime import open_runtime
from state.tenant_providers import TenantRouteCache
from state.vault import MasterKeys, TenantKeys
from topics import names
from topics.catalog import load_catalog
from topics.messages import RequestEnvelope
from topics.settings import Settings
from topics.tracing import Tracing, open_tracing
from workers.classifier.cascade import CascadeClassifier
from workers.classifier.metrics import ClassifierMetrics
from workers.classifier.stage import Labeller
from workers.consumer import ConsumerLoop
from workers.kafka_metrics import ConsumerMetrics
from workers.probes import process_registry, serve_probes
from workers.providers.anthropic import AnthropicMessages
from workers.providers.base import Dialect, MalformedHook, Timeouts
from workers.providers.gemini import GeminiGenerateContent
from workers.providers.openai_compat import OpenAICompat
from workers.router.access import AccessCheck
from workers.router.attempt import AttemptRunner, produce_usage
from workers.router.budgets import BudgetAlerts, RouterBudgets
from workers.router.cancel import CancelListener
from workers.router.council import Council, CouncilSettings
from workers.router.decide import Decider, ModeDefaults
from workers.router.execute import ExecutionSettings, Executor
from workers.router.frames import FrameWriter
from workers.router.latency import LatencyTracker
from workers.router.limits import RouterLimits
from workers.router.metrics import RouterMetrics
from workers.router.preview import Previewer
from workers.router.publisher import ReplyPublisher
from workers.router.routes import RouteConfig, RouteResolver
from workers.router.sampler import ThompsonSampler
from workers.router.worker import RouterWorker
from workers.runtime import run_process

log = logging.getLogger(__name__)


async def run_router(settings: Settings, stop: asyncio.Event) -> None:
    with open_tracing("router", content=settings.trace_content) as tracing:
        await _run_router(settings, stop, tracing)


async def _run_router(settings: Settings, stop: asyncio.Event, tracing: Tracing) -> None:
    catalog = load_catalog(settings.catalog_path)
    route_config = RouteConfig(
        provider_keys={name: os.environ.get(p.api_key_env) or None
                       for name, p in catalog.providers.items()},
        base_urls=settings.provider_base_urls,
        fallback_url=settings.fallback_upstream_url,
        timeouts=Timeouts.from_settings(settings.router))
    cfg = settings.router
    registry = process_registry()
    metrics = RouterMetrics(registry, tenant_labels=settings.metrics.tenant_labels)
    labeller, topic, group_id = None, names.CLASSIFIED, names.CLASSIFIED_GROUP
    if cfg.classify_inline:
        classifier = CascadeClassifier.from_settings(settings.classifier)
        labeller = Labeller(classifier, max_batch=settings.classifier.max_batch,
                            tracing=tracing, metrics=ClassifierMetrics(registry))
        topic, group_id = names.REQUESTS, names.REQUESTS_GROUP
    worker_id = f"router-{uuid.uuid4().hex[:12]}"

    async with open_runtime(settings) as runtime:
        probes = await serve_probes(runtime, registry, cfg.metrics_host, cfg.metrics_port)
        producer, client, pool = runtime.producer, runtime.redis, runtime.pool
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.upstream_pool_size),
            timeout=aiohttp.ClientTimeout(total=cfg.upstream_total_timeout_s,
                                          sock_connect=cfg.upstream_connect_timeout_s))
        runtime.on_close(http.close)
        tenant_keys = TenantKeys(pool, MasterKeys.from_settings(settings.vault),
                                 ttl_s=settings.vault.cache_ttl_s)
        consumer = await runtime.consumer(group_id)

        claims = Claims(client, worker_id=worker_id, claim_ttl_s=cfg.claim_ttl_s,
                        heartbeat_ttl_ms=cfg.heartbeat_ttl_ms)
        await claims.heartbeat()
        runtime.on_close(claims.retire, name="claims", quiet=True)
        publisher = await runtime.enter(ReplyPublisher(
            client, flush_interval_s=cfg.reply_flush_interval_ms / 1000))
        cancels = CancelListener(client, check_s=settings.redis.reply_check_s,
                                 answer_s=settings.redis.socket_timeout_s)
        store = PosteriorStore(client, half_life_s=cfg.bandit_half_life_s)
        # A random seed per process: workers must not draw in lockstep.
        seed = int.from_bytes(os.urandom(8), "big")
        # One for the process: a Redis outage noticed by one of them spares the others a wait.
        degraded = Degraded(metrics.redis_fallback)
        breakers = Breakers(client, BreakerConfig.from_settings(cfg),
                            cache_ttl_s=cfg.breaker_cache_ttl_s, degraded=degraded)
        # Each tenant's catalog with its registered providers; changes reach it at once over
        # the revocation broadcast (a tenant revocation), else within the TTL.
        tenant_routes = TenantRouteCache(pool, catalog, ttl_s=cfg.policy_cache_ttl_s)
        decider = Decider(catalog, PolicyCache(pool, ttl_s=cfg.policy_cache_ttl_s), store,
                          CachedPosteriors(store, ttl_s=cfg.posterior_cache_ttl_s,
                                           degraded=degraded),
                          ThompsonSampler(seed), breakers, feedback_rate=cfg.feedback_rate,
                          defaults=ModeDefaults.from_settings(cfg), degraded=degraded,
                          tracing=tracing, metrics=metrics,
                          catalogs=tenant_routes.catalog_for)
        runtime.on_close(decider.drain, name="decisions' background work", quiet=True)
        latency = LatencyTracker()
        runner = AttemptRunner(dialects=dialects(http, metrics.malformed_event),
                               producer=producer, decider=decider,
                               breakers=breakers, latency=latency, metrics=metrics,
                               tracing=tracing)
        resolver = RouteResolver(catalog, route_config, tenant_keys.key_for,
                                 tenant_routes.catalog_for)
        # Each request's key and tenant, re-checked; revocations reach the cache at once.
        access = AccessCheck(pool, ttl_s=cfg.key_cache_ttl_s)
        limit_store = LimitStore(pool, ttl_s=settings.limits.cache_ttl_s,
                                 default_fail_open=settings.limits.fail_open) \
            if settings.limits.enabled else None
        limits = None if limit_store is None else RouterLimits(client, limit_store, metrics)
        caches: list[Revocable] = [access, tenant_routes, tenant_keys]
        if limit_store is not None:
            caches.append(limit_store)
        revocations = RevocationListener(client, caches,
                                         check_s=settings.redis.revocation_check_s,
                                         answer_s=settings.redis.socket_timeout_s)

        async def settled(request_id: str) -> None:
            """The attempts' bookkeeping, then the request's rate-limit reservation settled
            to the tokens they used."""
            events = runner.bill(request_id)
            try:
                await runner.settled(request_id)
            finally:
                if limits is not None:
                    await limits.settle(request_id, events)

        alerts = BudgetAlerts(producer, http, registry)
        runtime.on_close(alerts.drain)
        worker = RouterWorker(
            decider=decider, claims=claims, access=access,
            executor=Executor(runner, resolver, latency, ExecutionSettings.from_settings(cfg),
                              metrics),
            council=Council(runner, resolver, CouncilSettings.from_settings(cfg), metrics),
            frames=lambda env: FrameWriter(env.request_id, env.reply, publisher, producer,
                                           max_bytes=settings.kafka.max_message_bytes,
                                           books=runner, claims=claims, tracing=tracing),
            cancels=cancels, metrics=metrics, settled=settled, limits=limits, tracing=tracing,
            rebill=functools.partial(produce_usage, producer),
            label=labeller.label if labeller is not None else None,
            budgets=RouterBudgets(
                BudgetCache(pool, ttl_s=cfg.budget_cache_ttl_s), BudgetLedger(client, pool),
                catalog, {"speculative": cfg.race_routes, "hedged": cfg.hedge_routes,
                          "council": cfg.council_members},
                runner.bill, alerts),
            preview=Previewer(decider, latency, tenant_routes.routes_for))
        loop = ConsumerLoop(consumer=consumer, producer=producer, topic=topic,
                            decode=RequestEnvelope.from_json, handler=worker.handle,
                            max_in_flight=cfg.max_in_flight,
                            shutdown_grace_s=cfg.shutdown_grace_s,
                            close_remaining=runtime.close_remaining,
                            metrics=ConsumerMetrics(registry, group_id))
        probes.watch(loop.status)
        log.info("router %s consuming %s", worker_id, topic)
        background = [asyncio.create_task(cancels.run()),
                      asyncio.create_task(revocations.run()),
                      asyncio.create_task(_heartbeat(claims, cfg.heartbeat_ttl_ms / 3000))]
        try:
            await loop.run(stop)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        log.info("router %s stopped", worker_id)


def dialects(http: aiohttp.ClientSession,
             on_malformed: MalformedHook | None = None) -> dict[str, Dialect]:
    """One adapter per wire protocol, all sharing the process's HTTP pool."""
    return {"openai": OpenAICompat(http, on_malformed),
            "anthropic": AnthropicMessages(http, on_malformed),
            "gemini": GeminiGenerateContent(http, on_malformed)}


async def _heartbeat(claims: Claims, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await claims.heartbeat()
        except redis.RedisError:
            log.warning("heartbeat failed; will retry")


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_router(settings, stop), settings.log_level,
                grace_s=settings.router.shutdown_grace_s,
                close_timeout_s=settings.shutdown_close_timeout_s,
                process="router", log_format=settings.log_format)
