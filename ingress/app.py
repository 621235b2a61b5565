"""The ingress application: one lifespan owns every resource of the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ingress.auth import Authenticator
from ingress.chat import ChatCompletions
from ingress.embeddings import Embeddings
from ingress.errors import on_http_exception, on_switchyard_error
from ingress.insights import LearningDeps, advisor_route, feedback_route, stats_route
from ingress.metrics import IngressMetrics
from ingress.middleware import RequestIdentity
from ingress.ops import OpsDeps, health_route, metrics_route, models_route
from ingress.pipeline import Pipeline
from ingress.replies import ReplyRouter
from ingress.routing_policies import (
    RoutingPolicyDeps,
    delete_policy_route,
    get_policy_route,
    put_policy_route,
)
from ingress.vault import (
    VaultDeps,
    delete_key_route,
    list_keys_route,
    rotate_key_route,
    store_key_route,
)
from state.bandit import PosteriorStore
from state.breakers import Breakers, breaker_config
from state.keys import find_key
from state.redis_client import make_redis
from state.vault import MasterKeys
from topics import names
from topics.catalog import load_catalog
from topics.errors import SwitchyardError
from topics.heap import settle_heap
from topics.kafka import make_producer
from topics.settings import Settings

log = logging.getLogger(__name__)

ROUTES = frozenset({"/v1/chat/completions", "/v1/infer", "/v1/embeddings", "/v1/advisor",
                    "/v1/feedback", "/v1/providers/stats",
                    "/v1/models",
                    "/v1/health", "/metrics", "/v1/vault/keys", "/v1/routing/policy"})


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings()
    catalog = load_catalog(settings.catalog_path)
    # Malformed master keys fail the start; absent ones make the vault routes 503.
    master_keys = MasterKeys.from_settings(settings.vault)
    metrics = IngressMetrics(CollectorRegistry())

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[dict[str, Any]]:
        async with contextlib.AsyncExitStack() as resources:
            producer = make_producer(settings.kafka)
            await producer.start()
            resources.push_async_callback(producer.stop)
            client = make_redis(settings.redis)
            resources.push_async_callback(client.aclose)
            pool = await asyncpg.create_pool(settings.postgres.dsn,
                                             min_size=settings.postgres.pool_min,
                                             max_size=settings.postgres.pool_max)
            resources.push_async_callback(pool.close)

            replies = ReplyRouter(client, names.reply_channel(uuid.uuid4().hex))
            subscribed = asyncio.Event()
            reader = asyncio.create_task(replies.run(subscribed))
            resources.push_async_callback(_cancel, reader)
            await asyncio.wait_for(subscribed.wait(), timeout=10)

            async def lookup(key: str) -> Any:
                return await find_key(pool, key)

            auth = Authenticator(lookup, ttl_s=settings.ingress.auth_cache_ttl_s,
                                 negative_ttl_s=settings.ingress.auth_negative_cache_ttl_s)
            ops = OpsDeps(auth=auth, catalog=catalog, producer=producer, redis=client,
                          pool=pool, metrics=metrics,
                          health_timeout_s=settings.ingress.health_timeout_s)
            pipeline = Pipeline(settings=settings.ingress, producer=producer,
                                redis_client=client, replies=replies, metrics=metrics)
            vault = VaultDeps(auth=auth, catalog=catalog, pool=pool, keys=master_keys)
            policies = RoutingPolicyDeps(auth=auth, catalog=catalog, pool=pool)
            learning = LearningDeps(
                auth=auth, pool=pool, catalog=catalog,
                store=PosteriorStore(client, half_life_s=settings.router.bandit_half_life_s),
                feedback_rate=settings.router.feedback_rate,
                breakers=Breakers(client, breaker_config(settings.router)))
            settle_heap()
            log.info("ingress ready; replies on %s", replies.channel)
            yield {
                "chat": ChatCompletions(pipeline, auth, catalog),
                "embeddings": Embeddings(pipeline, auth, catalog),
                "advisor": advisor_route(auth, pool),
                "feedback": feedback_route(learning),
                "stats": stats_route(learning),
                "models": models_route(ops),
                "health": health_route(ops),
                "metrics": metrics_route(ops),
                "vault_store": store_key_route(vault),
                "vault_list": list_keys_route(vault),
                "vault_rotate": rotate_key_route(vault),
                "vault_delete": delete_key_route(vault),
                "policy_get": get_policy_route(policies),
                "policy_put": put_policy_route(policies),
                "policy_delete": delete_policy_route(policies),
            }

    def handler(name: str) -> Any:
        async def endpoint(request: Request) -> Response:
            route: Any = getattr(request.state, name)
            response: Response = await route(request)
            return response

        return endpoint

    return Starlette(
        routes=[
            Route("/v1/chat/completions", handler("chat"), methods=["POST"]),
            Route("/v1/infer", handler("chat"), methods=["POST"]),  # the seed product's name
            Route("/v1/embeddings", handler("embeddings"), methods=["POST"]),
            Route("/v1/advisor", handler("advisor"), methods=["GET"]),
            Route("/v1/feedback", handler("feedback"), methods=["POST"]),
            Route("/v1/providers/stats", handler("stats"), methods=["GET"]),
            Route("/v1/models", handler("models"), methods=["GET"]),
            Route("/v1/health", handler("health"), methods=["GET"]),
            Route("/metrics", handler("metrics"), methods=["GET"]),
            Route("/v1/vault/keys", handler("vault_store"), methods=["POST"]),
            Route("/v1/vault/keys", handler("vault_list"), methods=["GET"]),
            Route("/v1/vault/keys/{provider}/rotate", handler("vault_rotate"),
                  methods=["POST"]),
            Route("/v1/vault/keys/{provider}", handler("vault_delete"), methods=["DELETE"]),
            Route("/v1/routing/policy", handler("policy_get"), methods=["GET"]),
            Route("/v1/routing/policy", handler("policy_put"), methods=["PUT"]),
            Route("/v1/routing/policy", handler("policy_delete"), methods=["DELETE"]),
        ],
        middleware=[Middleware(RequestIdentity, metrics=metrics, routes=ROUTES)],
        exception_handlers={SwitchyardError: on_switchyard_error,
                            HTTPException: on_http_exception},
        lifespan=lifespan,
    )


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
