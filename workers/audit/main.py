"""The audit process: `audit.events` into each tenant's append-only hash chain
(`state/audit.py`).

Exactly once in effect: an event whose id is already recorded adds nothing (a redelivery),
and offsets are committed past an event only once its row is written (workers/consumer.py).
A tenant's events are keyed by tenant on the topic, so they arrive in order on one partition;
here they are appended one at a time, in that order, while other tenants' are written
concurrently. The chain's lock in PostgreSQL keeps a second writer (a rebalance, a replica)
from forking it. A message that is not an audit event goes to `audit.events.dlq` with its
reason; while PostgreSQL is down, events wait and are retried, never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from state.audit import append_event
from state.runtime import Needs, open_runtime, outage
from topics import names
from topics.audit import AuditEvent
from topics.settings import Settings
from topics.tracing import Tracing, open_tracing
from workers.audit.metrics import AuditMetrics
from workers.consumer import ConsumerLoop
from workers.kafka_metrics import ConsumerMetrics
from workers.probes import process_registry, serve_probes
from workers.runtime import run_process

log = logging.getLogger(__name__)

_RETRY_MAX_S = 5.0


class TenantTurns:
    """One write at a time per tenant, in the order the writes asked (asyncio's locks are
    first come, first served). A tenant's lock lives only while someone holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def turn(self, tenant_id: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(tenant_id) or (asyncio.Lock(), 0)
        self._locks[tenant_id] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[tenant_id]
            if users == 1:
                del self._locks[tenant_id]
            else:
                self._locks[tenant_id] = (lock, users - 1)


async def run_audit(settings: Settings, stop: asyncio.Event) -> None:
    with open_tracing("audit", content=settings.trace_content) as tracing:
        await _run_audit(settings, stop, tracing)


async def _run_audit(settings: Settings, stop: asyncio.Event, tracing: Tracing) -> None:
    cfg = settings.audit
    # The producer is for the DLQ; no Redis: the audit trail never waits on it.
    async with open_runtime(settings, Needs(redis=False)) as runtime:
        registry = process_registry()
        probes = await serve_probes(runtime, registry, cfg.metrics_host, cfg.metrics_port)
        pool = runtime.pool
        consumer = await runtime.consumer(names.AUDIT_GROUP)

        metrics = AuditMetrics(registry)
        turns = TenantTurns()

        async def append(event: AuditEvent) -> bool:
            delay_s = 0.1
            while True:
                try:
                    with metrics.append_duration.time():
                        async with asyncio.timeout(cfg.write_timeout_s):
                            return await append_event(pool, event)
                except Exception as exc:
                    if outage(exc) is None:
                        raise  # a bug or a refused row: the consumer loop dead-letters it
                    # The database is down or restarting: the event waits, never dropped.
                    log.warning("audit append failed (%s); retrying in %.1fs", exc, delay_s)
                    await asyncio.sleep(delay_s)
                    delay_s = min(delay_s * 2, _RETRY_MAX_S)

        async def handle(event: AuditEvent, record: Any) -> None:
            # The turn is the first thing awaited: turns are taken in the order the consumer
            # loop started the handlers, which is the partition's order.
            with tracing.consume(f"{names.AUDIT} process", record,
                                 request_id=event.request_id,
                                 attributes={"switchyard.audit.action": event.action}):
                async with turns.turn(event.tenant_id):
                    added = await append(event)
            metrics.offered.labels("written" if added else "duplicate").inc()

        loop = ConsumerLoop(consumer=consumer, producer=runtime.producer, topic=names.AUDIT,
                            decode=AuditEvent.from_json, handler=handle,
                            max_in_flight=cfg.max_in_flight, shutdown_grace_s=cfg.shutdown_grace_s,
                            close_remaining=runtime.close_remaining,
                            metrics=ConsumerMetrics(registry, names.AUDIT_GROUP))
        probes.watch(loop.status)
        log.info("audit writer consuming %s", names.AUDIT)
        await loop.run(stop)


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_audit(settings, stop), settings.log_level,
                grace_s=settings.audit.shutdown_grace_s,
                close_timeout_s=settings.shutdown_close_timeout_s,
                process="audit", log_format=settings.log_format)
