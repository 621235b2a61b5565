"""Kafka helpers for tests that act as a batch producer or an outside consumer."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from topics import names
from topics.settings import KafkaSettings


def _reader(settings: KafkaSettings, topic: str) -> AIOKafkaConsumer:
    # No group: the consumer assigns itself every partition of the topic.
    return AIOKafkaConsumer(topic, bootstrap_servers=settings.bootstrap_servers,
                            enable_auto_commit=False, auto_offset_reset="earliest")


async def read_topic(settings: KafkaSettings, topic: str, until: Callable[[list[Any]], bool],
                     timeout_s: float = 20) -> list[Any]:
    """Every record of `topic` from the beginning, read until `until(records)` holds."""
    consumer = _reader(settings, topic)
    await consumer.start()
    try:
        records: list[Any] = []
        async with asyncio.timeout(timeout_s):
            while not until(records):
                batch = await consumer.getmany(timeout_ms=200)
                for part in batch.values():
                    records.extend(part)
        return records
    finally:
        await consumer.stop()


async def caught_up(settings: KafkaSettings, group: str, topic: str) -> bool:
    """Whether consumer group `group` has committed every message `topic` holds."""
    return await group_lag(settings, group, topic) == 0


async def group_lag(settings: KafkaSettings, group: str, topic: str) -> int:
    """Messages of `topic` not yet committed by consumer group `group`."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    consumer = _reader(settings, topic)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        ends = await consumer.end_offsets(list(consumer.assignment()))
        return sum(end - (committed[tp].offset if tp in committed else 0)
                   for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def request_ids_in(settings: KafkaSettings, topic: str, timeout_s: float = 20) -> set[str]:
    """The request-id headers of every record `topic` holds now."""
    consumer = _reader(settings, topic)
    await consumer.start()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        ids: set[str] = set()
        async with asyncio.timeout(timeout_s):
            for tp, end in ends.items():
                while await consumer.position(tp) < end:
                    for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                        ids.update(value.decode() for key, value in record.headers
                                   if key == names.H_REQUEST_ID)
        return ids
    finally:
        await consumer.stop()
