"""The Redis client factory: one pool per process."""

from __future__ import annotations

import redis.asyncio as redis

from topics.settings import RedisSettings


def make_redis(settings: RedisSettings) -> redis.Redis:
    # Blocking pool: under a burst, callers wait for a free connection instead of failing
    # with "Too many connections" (the default pool's behaviour).
    pool = redis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.max_connections, timeout=settings.pool_timeout_s,
        # Bounded: a paused Redis (SIGSTOP, a network partition) would otherwise hang a call
        # for ever. A pub/sub `listen()` still blocks without limit (redis-py reads it with no
        # timeout); `ingress/replies.py` checks its subscription itself.
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s)
    # from_pool: the client owns its pool, so `aclose()` closes the pool's connections too
    # (`Redis(connection_pool=...)` would leave them open for the garbage collector).
    return redis.Redis.from_pool(pool)
