"""The router process: owns its producer, consumer, Redis pool and HTTP pool, and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid

import aiohttp
import asyncpg
import redis.asyncio as redis
from prometheus_client import CollectorRegistry

from state.bandit import CachedPosteriors, PosteriorStore
from state.breakers import Breakers, breaker_config
from state.claims import Claims
from state.redis_client import make_redis
from state.routing_policy import PolicyCache
from state.vault import MasterKeys, TenantKeys
from topics import names
from topics.bandit import ThompsonSampler
from topics.catalog import load_catalog
from topics.kafka import make_consumer, make_producer
from topics.messages import RequestEnvelope
from topics.settings import Settings
from workers.classifier.model import PromptClassifier
from workers.classifier.stage import Labeller
from workers.consumer import ConsumerLoop
from workers.providers.anthropic import AnthropicMessages
from workers.providers.base import Dialect, Timeouts
from workers.providers.gemini import GeminiGenerateContent
from workers.providers.openai_compat import OpenAICompat
from workers.router.attempt import AttemptRunner
from workers.router.cancel import CancelListener
from workers.router.council import Council, CouncilSettings
from workers.router.decide import Decider, ModeDefaults
from workers.router.execute import ExecutionSettings, Executor
from workers.router.frames import FrameWriter
from workers.router.latency import LatencyTracker
from workers.router.metrics import RouterMetrics
from workers.router.publisher import ReplyPublisher
from workers.router.routes import RouteConfig, RouteResolver
from workers.router.worker import RouterWorker
from workers.runtime import run_process, serve_metrics

log = logging.getLogger(__name__)


async def run_router(settings: Settings, stop: asyncio.Event) -> None:
    catalog = load_catalog(settings.catalog_path)
    route_config = RouteConfig(
        provider_keys={name: os.environ.get(p.api_key_env) or None
                       for name, p in catalog.providers.items()},
        base_urls=settings.provider_base_urls,
        fallback_url=settings.fallback_upstream_url,
        timeouts=Timeouts(connect_s=settings.router.upstream_connect_timeout_s,
                          ttft_s=settings.router.upstream_ttft_timeout_s,
                          idle_s=settings.router.upstream_idle_timeout_s,
                          total_s=settings.router.upstream_total_timeout_s))
    cfg = settings.router
    labeller, topic, group_id = None, names.CLASSIFIED, names.CLASSIFIED_GROUP
    if cfg.classify_inline:
        classifier = PromptClassifier(settings.classifier.model_path)
        labeller = Labeller(classifier.classify, max_batch=settings.classifier.max_batch)
        topic, group_id = names.REQUESTS, names.REQUESTS_GROUP
    worker_id = f"router-{uuid.uuid4().hex[:12]}"
    registry = CollectorRegistry()
    metrics = RouterMetrics(registry)

    async with contextlib.AsyncExitStack() as resources:
        resources.callback(serve_metrics(registry, cfg.metrics_port))
        producer = make_producer(settings.kafka)
        await producer.start()
        resources.push_async_callback(producer.stop)
        client = make_redis(settings.redis)
        resources.push_async_callback(client.aclose)
        http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=cfg.upstream_pool_size),
            timeout=aiohttp.ClientTimeout(total=cfg.upstream_total_timeout_s,
                                          sock_connect=cfg.upstream_connect_timeout_s))
        resources.push_async_callback(http.close)
        pool = await asyncpg.create_pool(settings.postgres.dsn,
                                         min_size=settings.postgres.pool_min,
                                         max_size=settings.postgres.pool_max)
        resources.push_async_callback(pool.close)
        tenant_keys = TenantKeys(pool, MasterKeys.from_settings(settings.vault),
                                 ttl_s=settings.vault.cache_ttl_s)
        consumer = make_consumer(settings.kafka, group_id)
        await consumer.start()
        resources.push_async_callback(consumer.stop)

        claims = Claims(client, worker_id=worker_id, claim_ttl_s=cfg.claim_ttl_s,
                        heartbeat_ttl_ms=cfg.heartbeat_ttl_ms)
        await claims.heartbeat()
        resources.push_async_callback(claims.retire)
        publisher = await resources.enter_async_context(ReplyPublisher(
            client, flush_interval_s=cfg.reply_flush_interval_ms / 1000))
        cancels = CancelListener(client)
        store = PosteriorStore(client, half_life_s=cfg.bandit_half_life_s)
        # A random seed per process: workers must not draw in lockstep.
        seed = int.from_bytes(os.urandom(8), "big")
        breakers = Breakers(client, breaker_config(cfg), cache_ttl_s=cfg.breaker_cache_ttl_s)
        decider = Decider(catalog, PolicyCache(pool, ttl_s=cfg.policy_cache_ttl_s), store,
                          CachedPosteriors(store, ttl_s=cfg.posterior_cache_ttl_s),
                          ThompsonSampler(seed), breakers, feedback_rate=cfg.feedback_rate,
                          defaults=ModeDefaults(race_routes=cfg.race_routes,
                                                hedge_routes=cfg.hedge_routes,
                                                council_members=cfg.council_members,
                                                judge_model=cfg.council_judge_model))
        latency = LatencyTracker()
        runner = AttemptRunner(dialects=dialects(http), producer=producer, decider=decider,
                               breakers=breakers, latency=latency, metrics=metrics)
        resolver = RouteResolver(catalog, route_config, tenant_keys.key_for)
        worker = RouterWorker(
            decider=decider, claims=claims,
            executor=Executor(runner, resolver, latency, ExecutionSettings(
                max_attempts=cfg.max_attempts, hedge_percentile=cfg.hedge_percentile,
                hedge_default_delay_ms=cfg.hedge_default_delay_ms)),
            council=Council(runner, resolver, CouncilSettings(
                quorum=cfg.council_quorum, member_timeout_s=cfg.council_member_timeout_s,
                judge_timeout_s=cfg.council_judge_timeout_s,
                progress_every_s=cfg.council_progress_every_s)),
            frames=lambda env: FrameWriter(env.request_id, env.reply, publisher, producer),
            cancels=cancels, metrics=metrics, settled=runner.settled,
            label=labeller.label if labeller is not None else None)
        loop = ConsumerLoop(consumer=consumer, producer=producer, topic=topic,
                            decode=RequestEnvelope.from_json, handler=worker.handle,
                            max_in_flight=cfg.max_in_flight,
                            shutdown_grace_s=cfg.shutdown_grace_s)
        log.info("router %s consuming %s", worker_id, topic)
        background = [asyncio.create_task(cancels.run()),
                      asyncio.create_task(_heartbeat(claims, cfg.heartbeat_ttl_ms / 3000))]
        try:
            await loop.run(stop)
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
        log.info("router %s stopped", worker_id)


def dialects(http: aiohttp.ClientSession) -> dict[str, Dialect]:
    """One adapter per wire protocol, all sharing the process's HTTP pool."""
    return {"openai": OpenAICompat(http), "anthropic": AnthropicMessages(http),
            "gemini": GeminiGenerateContent(http)}


async def _heartbeat(claims: Claims, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await claims.heartbeat()
        except redis.RedisError:
            log.warning("heartbeat failed; will retry")


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_router(settings, stop), settings.log_level)
