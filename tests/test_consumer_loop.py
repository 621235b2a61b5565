"""The consume loop every worker runs, on the real broker: stopping it interrupts a waiting
poll at once, finishes and commits the work in flight first, and an outside cancellation
is not mistaken for a stop. Records fetched before a rebalance are not started after it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from compose.stack import LocalStack
from tests.conftest import eventually
from tests.kafka_util import group_lag
from topics.kafka import make_consumer, make_producer
from workers.consumer import ConsumerLoop

# Long enough that a loop that waited out its poll instead of being interrupted fails the
# test's own bound.
_POLL_S = 120.0


@dataclass
class Running:
    """A loop running over its own topic, with a handler that holds each message until
    `release` is set."""

    topic: str
    group: str
    producer: AIOKafkaProducer
    consumer: AIOKafkaConsumer
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: list[bytes] = field(default_factory=list)
    finished: list[bytes] = field(default_factory=list)
    task: asyncio.Task[None] | None = None
    loop: ConsumerLoop[bytes] | None = None

    async def handle(self, message: bytes, _record: object) -> None:
        self.started.append(message)
        await self.release.wait()
        self.finished.append(message)


@pytest.fixture
async def running(stack: LocalStack) -> AsyncIterator[Running]:
    kafka = stack.settings.kafka
    topic, group = f"test.loop.{uuid.uuid4().hex[:8]}", f"test-loop-{uuid.uuid4().hex[:8]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    finally:
        await admin.close()
    producer, consumer = make_producer(kafka), make_consumer(kafka, group)
    await producer.start()
    await consumer.start()
    state = Running(topic, group, producer, consumer)
    state.loop = ConsumerLoop(consumer=consumer, producer=producer, topic=topic,
                              decode=lambda raw: raw, handler=state.handle, max_in_flight=8,
                              shutdown_grace_s=30, commit_interval_s=_POLL_S)
    state.task = asyncio.create_task(state.loop.run(state.stop))
    await eventually(consumer.assignment)
    try:
        yield state
    finally:
        state.release.set()
        state.stop.set()
        await asyncio.wait({state.task})
        await consumer.stop()
        await producer.stop()


async def test_stop_interrupts_a_waiting_poll_at_once(running: Running) -> None:
    assert running.task is not None
    await asyncio.sleep(0.5)  # the loop is inside its poll, which would last _POLL_S
    running.stop.set()
    done, _ = await asyncio.wait({running.task}, timeout=_POLL_S / 4)
    assert done, "the loop waited out its poll instead of stopping"
    assert running.task.exception() is None


async def test_stop_finishes_and_commits_the_work_in_flight(stack: LocalStack,
                                                            running: Running) -> None:
    assert running.task is not None
    for n in range(3):
        await running.producer.send_and_wait(running.topic, f"m{n}".encode())
    await eventually(lambda: len(running.started) == 3)
    running.stop.set()
    done, _ = await asyncio.wait({running.task}, timeout=1.0)
    assert not done, "the loop returned with work still in flight"
    running.release.set()
    await asyncio.wait_for(running.task, timeout=_POLL_S / 4)
    assert sorted(running.finished) == [b"m0", b"m1", b"m2"]
    # Committed on the way out, though the commit interval is far from over.
    assert await group_lag(stack.settings.kafka, running.group, running.topic) == 0


async def test_a_cancellation_from_outside_is_not_taken_for_a_stop(running: Running) -> None:
    assert running.task is not None
    await asyncio.sleep(0.5)
    running.task.cancel()
    await asyncio.wait({running.task}, timeout=_POLL_S / 4)
    assert running.task.cancelled()
    assert not running.stop.is_set()


async def test_records_fetched_before_a_rebalance_are_not_started_after_it(
        running: Running) -> None:
    assert running.loop is not None
    tp = TopicPartition(running.topic, 0)
    sent = [f"m{n}".encode() for n in range(16)]
    for message in sent:  # the handler holds the first 8, which take every slot
        await running.producer.send_and_wait(running.topic, message, partition=0)
    await eventually(lambda: len(running.started) == 8)
    # A fetch holds m8 at least, waiting for a slot.
    await eventually(lambda: _fetched_past(running.consumer, tp, 8))

    # A rebalance that gives the partition back to this loop, as the eager protocol does:
    # the revocation, then reading again from the committed offset (none: nothing finished).
    await running.loop.revoked(set(running.consumer.assignment()))
    running.consumer.seek(tp, 0)
    running.release.set()
    await eventually(lambda: len(running.finished) >= 8 + 16)
    await asyncio.sleep(0.5)
    # The held batch's stale copies would have been started ahead of the re-read.
    assert running.started == sent[:8] + sent


async def _fetched_past(consumer: AIOKafkaConsumer, tp: TopicPartition, offset: int) -> bool:
    position: int = await consumer.position(tp)
    return position > offset
