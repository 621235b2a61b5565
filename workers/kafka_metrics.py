"""Prometheus metrics of a Kafka consumer, the same in every worker process (router, usage,
audit, classifier): fed by the consume loop (`workers/consumer.py`), labelled with the
consumer group. Bounded labels: topics and partitions are the deployment's, and a revoked
partition's lag series is removed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# A commit is one round trip to the group coordinator.
_COMMIT_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

# Why a message went to `<topic>.dlq` (the free-text reason stays in the DLQ headers).
DLQ_REASONS = ("undecodable", "handler_failed")


class ConsumerMetrics:
    """One consumer group's metrics in one process."""

    def __init__(self, registry: CollectorRegistry, group: str) -> None:
        self.group = group
        self._lag = Gauge(
            "switchyard_kafka_consumer_lag", "Messages on a partition this consumer has not "
            "fetched yet: the partition's high watermark minus the consumer's position, "
            "measured every few seconds", ["group", "topic", "partition"], registry=registry)
        commit = Histogram(
            "switchyard_kafka_commit_duration_seconds", "One offset commit to the group "
            "coordinator", ["group"], buckets=_COMMIT_BUCKETS_S, registry=registry)
        assigned = Gauge(
            "switchyard_kafka_partitions_assigned", "Partitions assigned to this consumer now",
            ["group"], registry=registry)
        dlq = Counter(
            "switchyard_dlq_messages_total", "Messages sent to the dead-letter topic "
            "(`<topic>.dlq`), by reason: undecodable, handler_failed",
            ["group", "topic", "reason"], registry=registry)
        self._registry_dlq = dlq
        self.commit = commit.labels(group)
        self.assigned = assigned.labels(group)
        self._lag_children: dict[tuple[str, int], Gauge] = {}

    def lag(self, topic: str, partition: int, messages: int) -> None:
        child = self._lag_children.get((topic, partition))
        if child is None:
            child = self._lag_children[(topic, partition)] = self._lag.labels(
                self.group, topic, str(partition))
        child.set(messages)

    def forget(self, partitions: set[tuple[str, int]]) -> None:
        """Partitions no longer ours: their lag is another consumer's to report."""
        for topic, partition in partitions:
            if self._lag_children.pop((topic, partition), None) is not None:
                self._lag.remove(self.group, topic, str(partition))

    def dead_lettered(self, topic: str, reason: str) -> None:
        self._registry_dlq.labels(self.group, topic, reason).inc()
