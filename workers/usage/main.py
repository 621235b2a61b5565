"""The usage process: `llm.usage` into the PostgreSQL ledger and its daily rollup
(`state/usage.py`)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from opentelemetry.context import Context

from state.runtime import Needs, open_runtime
from state.usage import record_usage
from topics import names
from topics.messages import UsageEvent
from topics.settings import Settings
from topics.tracing import Link, SpanContext, SpanKind, Tracing, open_tracing
from workers.consumer import ConsumerLoop
from workers.kafka_metrics import ConsumerMetrics
from workers.probes import process_registry, serve_probes
from workers.runtime import run_process
from workers.usage.batcher import UsageBatcher
from workers.usage.metrics import UsageMetrics

log = logging.getLogger(__name__)


async def run_usage(settings: Settings, stop: asyncio.Event) -> None:
    with open_tracing("usage", content=settings.trace_content) as tracing:
        await _run_usage(settings, stop, tracing)


async def _run_usage(settings: Settings, stop: asyncio.Event, tracing: Tracing) -> None:
    cfg = settings.usage
    # The producer is for the DLQ; no Redis: billing never waits on it.
    async with open_runtime(settings, Needs(redis=False)) as runtime:
        registry = process_registry()
        probes = await serve_probes(runtime, registry, cfg.metrics_host, cfg.metrics_port)
        pool = runtime.pool
        consumer = await runtime.consumer(names.USAGE_GROUP,
                                          fetch_min_bytes=cfg.fetch_min_bytes,
                                          fetch_max_wait_ms=cfg.fetch_max_wait_ms)

        metrics = UsageMetrics(registry)

        # Each event's span while it waits for its statement: the write's span links them.
        waiting: dict[str, SpanContext] = {}

        async def write(events: Sequence[UsageEvent]) -> None:
            # One statement serves many requests' traces: a root span linked to each of
            # their events' spans (each of which lasts until this statement commits).
            links = [Link(ctx) for e in events if (ctx := waiting.get(e.event_id)) is not None]
            # A TimeoutError is retried by the batcher, like a refused connection.
            with tracing.span("usage ledger write", kind=SpanKind.CLIENT, parent=Context(),
                              links=links, attributes={"db.system.name": "postgresql",
                                                       "db.operation.name": "INSERT",
                                                       "switchyard.usage.rows": len(events)}), \
                    metrics.write_duration.time():
                async with asyncio.timeout(cfg.write_timeout_s):
                    await record_usage(pool, events)
            metrics.committed(events)

        batcher = UsageBatcher(write, batch_max=cfg.batch_max, linger_s=cfg.batch_linger_ms / 1000,
                               metrics=metrics)

        async def handle(event: UsageEvent, record: Any) -> None:
            # The request's trace (its traceparent header): this span lasts until the event
            # is in the ledger, so the usage write is part of the request's trace.
            with tracing.consume(f"{names.USAGE} process", record, request_id=event.request_id,
                                 attributes={"switchyard.usage.event_id": event.event_id,
                                             "switchyard.usage.attempt": event.attempt}) as span:
                if not span.is_recording():
                    await batcher.add(event)
                    return
                waiting[event.event_id] = span.get_span_context()
                try:
                    await batcher.add(event)
                finally:
                    waiting.pop(event.event_id, None)

        loop = ConsumerLoop(consumer=consumer, producer=runtime.producer, topic=names.USAGE,
                            decode=UsageEvent.from_json, handler=handle,
                            max_in_flight=cfg.max_in_flight, shutdown_grace_s=cfg.shutdown_grace_s,
                            close_remaining=runtime.close_remaining,
                            metrics=ConsumerMetrics(registry, names.USAGE_GROUP))
        probes.watch(loop.status)
        log.info("usage worker consuming %s", names.USAGE)
        await loop.run(stop)


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_usage(settings, stop), settings.log_level,
                grace_s=settings.usage.shutdown_grace_s,
                close_timeout_s=settings.shutdown_close_timeout_s,
                process="usage", log_format=settings.log_format)
