"""The resources a process opens against our infrastructure, owned by one context per process.

Every process (`ingress/app.py`'s lifespan, `workers/router/main.py`, `workers/usage/main.py`,
`workers/audit/main.py`, `workers/classifier/main.py`) enters `open_runtime` once, asks for
what it needs, and gets every resource closed in reverse order when it leaves, however it
leaves. The Kafka clients
come from `topics/kafka.py` (the one place that knows aiokafka's knobs) and the Redis client
from `state/redis_client.py`; this module only owns their lifetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import asyncpg
import redis.asyncio as redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from state.redis_client import make_redis
from state.tenancy import check_app_role
from topics.errors import Unavailable
from topics.kafka import check_message_limits, make_consumer, make_producer
from topics.settings import Settings

T = TypeVar("T")

log = logging.getLogger(__name__)

_LAST_TURN_S = 0.05


@dataclass(frozen=True, slots=True)
class Needs:
    """What a process connects to. A process that does not need PostgreSQL must not fail
    to start, or wait, because PostgreSQL is down."""

    kafka: bool = True
    redis: bool = True
    postgres: bool = True


class Runtime:
    """One process's shared clients. Asking for one the process did not open is a bug in
    that process's start-up, reported as such."""

    def __init__(self, settings: Settings, resources: contextlib.AsyncExitStack) -> None:
        self.settings = settings
        self._resources = resources
        self._closing = _Budget(settings.shutdown_close_timeout_s)
        self._producer: AIOKafkaProducer | None = None
        self._redis: redis.Redis | None = None
        self._pool: asyncpg.Pool | None = None

    @property
    def producer(self) -> AIOKafkaProducer:
        return _opened(self._producer, "kafka")

    @property
    def redis(self) -> redis.Redis:
        return _opened(self._redis, "redis")

    @property
    def pool(self) -> asyncpg.Pool:
        return _opened(self._pool, "postgres")

    def close_remaining(self) -> float:
        """Seconds left of the close budget, which starts counting at the first call (a
        consumer loop's last commit is the first thing a process does on its way out)."""
        return self._closing.remaining()

    async def consumer(self, group_id: str, *, fetch_min_bytes: int = 1,
                       fetch_max_wait_ms: int = 500) -> AIOKafkaConsumer:
        """A started consumer of `group_id`, stopped with the runtime (before the producer,
        so a consumer's last commit still has its broker connections)."""
        consumer = make_consumer(self.settings.kafka, group_id,
                                 fetch_min_bytes=fetch_min_bytes,
                                 fetch_max_wait_ms=fetch_max_wait_ms)
        await consumer.start()
        self.on_close(consumer.stop, name=f"kafka consumer {group_id}", quiet=True)
        return consumer

    async def enter(self, context: contextlib.AbstractAsyncContextManager[T]) -> T:
        """Enter `context` now and leave it when the runtime closes (within the budget)."""
        value = await type(context).__aenter__(context)
        name = type(context).__name__

        async def leave(exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> bool | None:
            try:
                async with asyncio.timeout(self._closing.remaining()):
                    return await type(context).__aexit__(context, exc_type, exc, tb)
            except TimeoutError:
                log.warning("closing %s: still waiting at the close budget's end; left as is",
                            name)
                return None

        self._resources.push_async_exit(leave)
        return value

    def on_close(self, callback: Callable[..., Awaitable[Any]], *args: Any,
                 name: str | None = None, abort: Callable[[], Any] | None = None,
                 quiet: bool = False) -> None:
        """Await `callback(*args)` when the runtime closes (in reverse order of registration),
        within what is left of the close budget; past it, the call is cancelled and `abort()`
        called. `quiet`: an error of the call is logged, not raised (a connection to a
        service that is down)."""
        label = name or str(getattr(callback, "__qualname__", repr(callback)))
        self._resources.push_async_callback(
            _bounded, self._closing, label, callback, args, abort, quiet)

    def on_close_sync(self, callback: Callable[[], Any]) -> None:
        self._resources.callback(callback)

    async def _open(self, needs: Needs) -> None:
        if needs.kafka:
            producer = make_producer(self.settings.kafka)
            await producer.start()
            self.on_close(producer.stop, name="kafka producer", quiet=True)
            self._producer = producer
            # Fail at start, saying what to change, rather than on the first large message.
            await check_message_limits(self.settings.kafka)
        if needs.redis:
            client = make_redis(self.settings.redis)
            self.on_close(client.aclose, name="redis", quiet=True)
            self._redis = client
        if needs.postgres:
            pg = self.settings.postgres
            pool = await asyncpg.create_pool(pg.dsn, min_size=pg.pool_min, max_size=pg.pool_max,
                                             timeout=pg.connect_timeout_s,
                                             command_timeout=pg.command_timeout_s)
            self.on_close(pool.close, name="postgres pool", abort=pool.terminate, quiet=True)
            # Fail at start on a role that row-level security does not bind (the owner's).
            await check_app_role(pool)
            self._pool = pool


@contextlib.asynccontextmanager
async def open_runtime(settings: Settings, needs: Needs | None = None) -> AsyncIterator[Runtime]:
    """Open what `needs` names (everything by default); close all of it on the way out."""
    async with contextlib.AsyncExitStack() as resources:
        runtime = Runtime(settings, resources)
        await runtime._open(needs or Needs())
        yield runtime


# What asyncpg raises when PostgreSQL cannot be reached, is restarting or was cut off; the
# rest (a bad statement, a constraint) are bugs or our own errors, never an outage.
_DATABASE_DOWN = (asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
                  asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError,
                  asyncpg.AdminShutdownError, asyncpg.CrashShutdownError, OSError, TimeoutError)
# What a client is told to wait (Retry-After) during an outage of our own infrastructure.
OUTAGE_RETRY_AFTER_S = 2.0


def outage(exc: BaseException) -> Unavailable | None:
    """Our 503 for `exc` if it says a service of the stack is down (PostgreSQL or Redis:
    what this runtime opened), else None. The one place their libraries' failures become
    errors a client may see (`ingress/call.py`, `ingress/auth.py`, `state/claims.py`)."""
    if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
        return _state_unavailable(exc)
    if isinstance(exc, _DATABASE_DOWN):
        return Unavailable(f"the gateway's database is unreachable: {type(exc).__name__}",
                           code="database_unavailable", retry_after_s=OUTAGE_RETRY_AFTER_S)
    return None


def _state_unavailable(exc: BaseException) -> Unavailable:
    return Unavailable(f"the gateway's shared state (Redis) is unreachable: "
                       f"{type(exc).__name__}", code="state_unavailable",
                       retry_after_s=OUTAGE_RETRY_AFTER_S)


class _Budget:
    """One deadline shared by every close of a runtime, set by the first close to run. A
    close that starts past it still gets `_LAST_TURN_S`: enough for one that needs nothing
    but this process (an HTTP pool, sockets to a service that answers), which is then not
    left open because another close used the budget up."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._deadline: float | None = None

    def remaining(self) -> float:
        now = time.monotonic()
        if self._deadline is None:
            self._deadline = now + self._seconds
        return max(_LAST_TURN_S, self._deadline - now)


async def _bounded(budget: _Budget, name: str, close: Callable[..., Awaitable[Any]],
                   args: tuple[Any, ...], abort: Callable[[], Any] | None,
                   quiet: bool) -> None:
    started = time.monotonic()
    try:
        async with asyncio.timeout(budget.remaining()):
            await close(*args)
    except TimeoutError:
        log.warning("closing %s: no answer within the close budget (%.1f s spent); %s", name,
                    time.monotonic() - started, "aborted" if abort else "left as is")
        if abort is not None:
            abort()
    except Exception:
        if not quiet:
            raise
        log.warning("closing %s failed", name, exc_info=True)
    else:
        log.debug("closed %s in %.3f s", name, time.monotonic() - started)


def _opened(resource: T | None, name: str) -> T:
    if resource is None:
        raise RuntimeError(f"this process did not open {name} (see its Needs)")
    return resource
