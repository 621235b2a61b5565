"""The classifier process: owns its consumer, producer and ONNX session, and closes them."""

from __future__ import annotations

import asyncio
import logging

from aiokafka.errors import KafkaError

from state.runtime import Needs, open_runtime
from topics import names
from topics.kafka import group_members
from topics.messages import RequestEnvelope
from topics.settings import KafkaSettings, Settings
from topics.tracing import Tracing, open_tracing
from workers.classifier.cascade import CascadeClassifier
from workers.classifier.metrics import ClassifierMetrics
from workers.classifier.stage import ClassifierStage, Labeller
from workers.consumer import ConsumerLoop
from workers.kafka_metrics import ConsumerMetrics
from workers.probes import process_registry, serve_probes
from workers.runtime import run_process

log = logging.getLogger(__name__)


async def run_classifier(settings: Settings, stop: asyncio.Event) -> None:
    with open_tracing("classifier", content=settings.trace_content) as tracing:
        await _run_classifier(settings, stop, tracing)


async def _run_classifier(settings: Settings, stop: asyncio.Event, tracing: Tracing) -> None:
    cfg = settings.classifier
    classifier = CascadeClassifier.from_settings(cfg)
    registry = process_registry()
    async with open_runtime(settings, Needs(redis=False, postgres=False)) as runtime:
        probes = await serve_probes(runtime, registry, cfg.metrics_host, cfg.metrics_port)
        producer = runtime.producer
        consumer = await runtime.consumer(names.REQUESTS_GROUP)
        stage = ClassifierStage(Labeller(classifier, max_batch=cfg.max_batch,
                                         tracing=tracing,
                                         metrics=ClassifierMetrics(registry)), producer,
                                tracing)
        loop = ConsumerLoop(consumer=consumer, producer=producer, topic=names.REQUESTS,
                            decode=RequestEnvelope.from_json, handler=stage.handle,
                            max_in_flight=cfg.max_in_flight,
                            shutdown_grace_s=cfg.shutdown_grace_s,
                            close_remaining=runtime.close_remaining,
                            metrics=ConsumerMetrics(registry, names.REQUESTS_GROUP))
        probes.watch(loop.status)
        log.info("classifier %s consuming %s", classifier.version, names.REQUESTS)
        check = asyncio.create_task(_warn_without_readers(settings.kafka,
                                                          cfg.reader_check_interval_s))
        try:
            await loop.run(stop)
        finally:
            check.cancel()
            await asyncio.gather(check, return_exceptions=True)


async def _warn_without_readers(kafka: KafkaSettings, every_s: float) -> None:
    """Routers that classify inline read llm.requests, not llm.classified. A classifier
    process beside only such routers forwards its share of the requests to nobody."""
    while True:
        await asyncio.sleep(every_s)
        try:
            readers = await group_members(kafka, names.CLASSIFIED_GROUP)
        except KafkaError as exc:
            log.warning("could not check the readers of %s: %s", names.CLASSIFIED, exc)
            continue
        if readers == 0:
            log.warning("no router reads %s (consumer group %r is empty): the requests this "
                        "classifier forwards wait there. Start routers with "
                        "SWITCHYARD_ROUTER__CLASSIFY_INLINE=false, or stop this process",
                        names.CLASSIFIED, names.CLASSIFIED_GROUP)


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_classifier(settings, stop), settings.log_level,
                grace_s=settings.classifier.shutdown_grace_s,
                close_timeout_s=settings.shutdown_close_timeout_s,
                process="classifier", log_format=settings.log_format)
