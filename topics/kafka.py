"""Kafka factories and the topic layout. The only place that knows aiokafka's knobs.

Message size: one setting, `kafka.max_message_bytes`, is the largest message the gateway
puts on a topic (checked by the ingress before it produces, and by the router before it
sends a reply frame). Every Kafka-side limit is that plus `HEADROOM` (record overhead,
headers, a dead letter's reason): each topic's `max.message.bytes` (set at creation, raised
by `ensure_topics` on existing topics, checked by `check_message_limits` at every process's
start), the producer's `max_request_size`, the consumers' fetch sizes, and the local broker's
`message.max.bytes` (compose/services.py)."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError

from topics import names
from topics.settings import KafkaSettings

log = logging.getLogger(__name__)

# Room above `max_message_bytes` on the Kafka side: a record batch's own overhead, the
# headers, and what `<topic>.dlq` adds to a message (its reason, up to 2000 bytes, and source).
HEADROOM = 65_536
_TOPIC_LIMIT = "max.message.bytes"
_DYNAMIC_TOPIC_CONFIG = 1  # DescribeConfigs v1+ config_source


class MessageLimitError(RuntimeError):
    """A topic on the broker takes smaller messages than the settings promise."""


def kafka_message_bytes(settings: KafkaSettings) -> int:
    """The limit every Kafka-side setting gets: topics, producer, consumers, the broker."""
    return settings.max_message_bytes + HEADROOM


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
    """Create the missing topics, with `max.message.bytes` from the settings, and raise it on
    existing topics where it is lower (their other settings are kept). Returns the names
    created."""
    limit = kafka_message_bytes(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        wanted = topic_partitions(settings)
        missing = [
            NewTopic(name=name, num_partitions=parts, replication_factor=1,
                     topic_configs={_TOPIC_LIMIT: str(limit)})
            for name, parts in wanted.items()
            if name not in existing
        ]
        if missing:
            # another launcher may win the race; the topics exist either way
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
        present = [name for name in wanted if name in existing]
        low = [name for name, value in (await _topic_limits(admin, present)).items()
               if value < limit]
        if low:
            await _raise_limits(admin, low, limit)
            log.warning("raised %s to %d on %s", _TOPIC_LIMIT, limit, ", ".join(low))
        return [t.name for t in missing]
    finally:
        await admin.close()


async def check_message_limits(settings: KafkaSettings) -> None:
    """Refuse to run against topics that would reject a message within the settings' limit
    (a 5 MB prompt would otherwise fail at the broker, as if Kafka were down)."""
    limit = kafka_message_bytes(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        present = [name for name in topic_partitions(settings) if name in existing]
        low = {name: value for name, value in (await _topic_limits(admin, present)).items()
               if value < limit}
    finally:
        await admin.close()
    if low:
        found = ", ".join(f"{name}={value}" for name, value in sorted(low.items()))
        raise MessageLimitError(
            f"Kafka topics take smaller messages than SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES "
            f"({settings.max_message_bytes}) needs: {_TOPIC_LIMIT} must be at least {limit} "
            f"(the setting + {HEADROOM} headroom), found {found}. Run `switchyard init` "
            f"(it raises them), or set {_TOPIC_LIMIT}={limit} on those topics, or lower the "
            f"setting (and SWITCHYARD_INGRESS__MAX_BODY_BYTES with it).")


async def _topic_limits(admin: AIOKafkaAdminClient, topics: list[str]) -> dict[str, int]:
    if not topics:
        return {}
    resources = [ConfigResource(ConfigResourceType.TOPIC, name, {_TOPIC_LIMIT: None})
                 for name in topics]
    limits: dict[str, int] = {}
    for response in await admin.describe_configs(resources):
        for error, message, _type, name, entries in response.resources:
            if error:
                # e.g. no DescribeConfigs permission: a check we cannot make must not stop
                # the gateway; a message over the topic's limit then fails at the broker.
                log.warning("cannot read %s of %s: %s", _TOPIC_LIMIT, name, message or error)
            for entry in entries:
                if entry[0] == _TOPIC_LIMIT:
                    limits[name] = int(entry[1])
    return limits


async def _raise_limits(admin: AIOKafkaAdminClient, topics: list[str], limit: int) -> None:
    # AlterConfigs replaces a topic's whole set of overrides: keep the ones it has.
    resources = [ConfigResource(ConfigResourceType.TOPIC, name) for name in topics]
    kept: dict[str, dict[str, Any]] = {name: {} for name in topics}
    for response in await admin.describe_configs(resources):
        for _error, _message, _type, name, entries in response.resources:
            for entry in entries:
                key, value, _read_only, source_or_default = entry[:4]
                overridden = (source_or_default == _DYNAMIC_TOPIC_CONFIG
                              if response.API_VERSION >= 1 else not source_or_default)
                if overridden and value is not None:
                    kept[name][key] = value
    responses = await admin.alter_configs([
        ConfigResource(ConfigResourceType.TOPIC, name, {**kept[name], _TOPIC_LIMIT: str(limit)})
        for name in topics])
    failed = [f"{name}: {message or error}" for response in responses
              for error, message, _type, name in response.resources if error]
    if failed:
        raise MessageLimitError(f"could not raise {_TOPIC_LIMIT} to {limit}: "
                                + "; ".join(failed))


def make_producer(settings: KafkaSettings) -> AIOKafkaProducer:
    # acks=all + idempotence: an accepted request is durable before the client hears "accepted".
    return AIOKafkaProducer(
        bootstrap_servers=settings.bootstrap_servers,
        acks="all",
        enable_idempotence=True,
        linger_ms=settings.linger_ms,
        request_timeout_ms=10_000,
        max_request_size=kafka_message_bytes(settings),
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
        # The largest message always fits one fetch (the broker would send a larger batch
        # alone anyway, but a client should not rely on it).
        max_partition_fetch_bytes=kafka_message_bytes(settings),
        fetch_max_bytes=max(52_428_800, kafka_message_bytes(settings)),
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
