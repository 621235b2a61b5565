"""The classifier process: owns its consumer, producer and ONNX session, and closes them."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from topics import names
from topics.kafka import make_consumer, make_producer
from topics.messages import RequestEnvelope
from topics.settings import Settings
from workers.classifier.model import PromptClassifier
from workers.classifier.stage import ClassifierStage, Labeller
from workers.consumer import ConsumerLoop
from workers.runtime import run_process

log = logging.getLogger(__name__)


async def run_classifier(settings: Settings, stop: asyncio.Event) -> None:
    cfg = settings.classifier
    classifier = PromptClassifier(cfg.model_path)
    async with contextlib.AsyncExitStack() as resources:
        producer = make_producer(settings.kafka)
        await producer.start()
        resources.push_async_callback(producer.stop)
        consumer = make_consumer(settings.kafka, names.REQUESTS_GROUP)
        await consumer.start()
        resources.push_async_callback(consumer.stop)
        stage = ClassifierStage(Labeller(classifier.classify, max_batch=cfg.max_batch), producer)
        loop = ConsumerLoop(consumer=consumer, producer=producer, topic=names.REQUESTS,
                            decode=RequestEnvelope.from_json, handler=stage.handle,
                            max_in_flight=cfg.max_in_flight,
                            shutdown_grace_s=cfg.shutdown_grace_s)
        log.info("classifier %s consuming %s", classifier.version, names.REQUESTS)
        await loop.run(stop)


def main() -> None:
    settings = Settings()
    run_process(lambda stop: run_classifier(settings, stop), settings.log_level)
