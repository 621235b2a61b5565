"""The Redis client factory: one pool per process."""

from __future__ import annotations

import redis.asyncio as redis

from topics.settings import RedisSettings


def make_redis(settings: RedisSettings) -> redis.Redis:
    # Blocking pool: under a burst, callers wait for a free connection instead of failing
    # with "Too many connections" (the default pool's behaviour).
    pool = redis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=settings.pool_timeout_s)
    return redis.Redis(connection_pool=pool)
