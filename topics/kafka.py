"""Kafka factories and the topic layout. The only place that knows aiokafka's knobs."""

from __future__ import annotations

import contextlib

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from topics import names
from topics.settings import KafkaSettings


def topic_partitions(settings: KafkaSettings) -> dict[str, int]:
    """Every topic the system uses, with its partition count. DLQs have one partition."""
    main = {
        names.REQUESTS: settings.request_partitions,
        names.CLASSIFIED: settings.request_partitions,
        names.USAGE: settings.usage_partitions,
        names.AUDIT: settings.usage_partitions,
        names.REPLIES: settings.reply_partitions,
    }
    return main | {names.dlq(topic): 1 for topic in main}


async def ensure_topics(settings: KafkaSettings) -> list[str]:
    """Create the missing topics; returns the names created."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name=name, num_partitions=parts, replication_factor=1)
            for name, parts in topic_partitions(settings).items()
            if name not in existing
        ]
        if missing:
            # another launcher may win the race; the topics exist either way
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        return [t.name for t in missing]
    finally:
        await admin.close()


def make_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    # acks=all + idempotence: an accepted request is durable before the client hears "accepted".
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        request_timeout_ms=10_000,
    )


def make_consumer(settings: KafkaSettings, group_id: str, *, fetch_min_bytes: int = 1,
                  fetch_max_wait_ms: int = 500) -> AIOKafkaConsumer:
    # Offsets are committed by hand, per partition, only past finished work. Not subscribed
    # yet: the consumer loop subscribes with its rebalance listener.
    return AIOKafkaConsumer(
        bootstrap_servers=settings.bootstrap_servers,
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        session_timeout_ms=settings.session_timeout_ms,
        heartbeat_interval_ms=settings.heartbeat_interval_ms,
        max_poll_records=500,
        # Long-poll: with the defaults a fetch returns as soon as data arrives, so the wait
        # costs no latency, and an idle consumer makes two fetches a second (at 100 ms, ten:
        # the router idled at ~10 CPU-ms/s instead of ~4, `python -m bench.idle`). A consumer
        # off the answer's path may ask for more bytes per fetch, trading delay for fewer
        # fetches.
        fetch_min_bytes=fetch_min_bytes,
        fetch_max_wait_ms=fetch_max_wait_ms,
    )


async def group_members(settings: KafkaSettings, group_id: str) -> int:
    """How many consumers are in `group_id` now (0 for a group nobody has joined)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group_id])
        # Raw DescribeGroups rows: (error_code, group_id, state, protocol_type, protocol,
        # members, ...).
        return sum(len(row[5]) for row in response.groups if row[1] == group_id)
    finally:
        await admin.close()
