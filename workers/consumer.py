"""The consume loop every worker runs: many messages in flight, bounded by a semaphore;
offsets committed per partition only up to the first unfinished message; undecodable
messages sent to `<topic>.dlq` with the reason; graceful drain on shutdown. Its metrics
(`workers/kafka_metrics.py`: lag per partition, commit time, partitions, DLQ counts) and its
readiness (`status`, served on `/readyz` by `workers/probes.py`) are kept here, once, for
every worker."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, IllegalStateError, KafkaError
from pydantic import ValidationError

from topics import names
from topics.tasks import Interrupted, unless
from workers.kafka_metrics import ConsumerMetrics

log = logging.getLogger(__name__)

M = TypeVar("M")
Handler = Callable[[M, Any], Awaitable[None]]


class OffsetTracker:
    """Per partition, the offsets in flight in arrival order and whether each is finished.
    The commit point is just past the longest finished prefix; it is offered until a commit
    of it succeeds, so a commit that failed is retried, not lost."""

    def __init__(self) -> None:
        self._inflight: dict[TopicPartition, dict[int, bool]] = {}
        self._uncommitted: dict[TopicPartition, int] = {}

    def start(self, tp: TopicPartition, offset: int) -> None:
        self._inflight.setdefault(tp, {})[offset] = False

    def finish(self, tp: TopicPartition, offset: int) -> None:
        offsets = self._inflight.get(tp)
        if offsets is not None and offset in offsets:  # absent: partition was revoked
            offsets[offset] = True

    def committable(self) -> dict[TopicPartition, int]:
        """Next offsets to commit for partitions whose finished prefix is past the last
        successful commit."""
        for tp, offsets in self._inflight.items():
            # dicts keep insertion order, and a partition's records are started in offset
            # order, all from one assignment (ConsumerLoop._start)
            for offset, done in list(offsets.items()):
                if not done:
                    break
                del offsets[offset]
                self._uncommitted[tp] = offset + 1
        return dict(self._uncommitted)

    def committed(self, positions: dict[TopicPartition, int]) -> None:
        for tp, position in positions.items():
            if self._uncommitted.get(tp) == position:  # else it moved on meanwhile
                del self._uncommitted[tp]

    def forget(self, partitions: set[TopicPartition]) -> None:
        for tp in partitions:
            self._inflight.pop(tp, None)
            self._uncommitted.pop(tp, None)

    def pending(self) -> int:
        return sum(1 for offsets in self._inflight.values() for done in offsets.values()
                   if not done)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, loop: ConsumerLoop[Any]) -> None:
        self._loop = loop

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self._loop.revoked(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("assigned %s", sorted(f"{tp.topic}[{tp.partition}]" for tp in assigned))
        self._loop.assigned(set(assigned))


class ConsumerLoop(Generic[M]):
    def __init__(
        self,
        *,
        consumer: AIOKafkaConsumer,
        producer: AIOKafkaProducer,
        topic: str,
        decode: Callable[[bytes], M],
        handler: Handler[M],
        max_in_flight: int,
        shutdown_grace_s: float,
        # Each commit is a write to the broker's offsets log; a crash redelivers at most
        # this much finished work, which the claims and event ids absorb.
        commit_interval_s: float = 0.5,
        # Seconds left for closing (`Runtime.close_remaining`): bounds the wait for work
        # cancelled past the grace period and the last commit, which a broker that does not
        # answer would otherwise hold forever. None: unbounded.
        close_remaining: Callable[[], float] | None = None,
        metrics: ConsumerMetrics | None = None,
        # How often the lag per partition is measured: a few dict reads per partition, not
        # per message.
        lag_interval_s: float = 5.0,
    ) -> None:
        self._consumer = consumer
        self._producer = producer
        self._topic = topic
        self._decode = decode
        self._handler = handler
        self._slots = asyncio.Semaphore(max_in_flight)
        self._max_in_flight = max_in_flight
        self._grace_s = shutdown_grace_s
        self._commit_interval_s = commit_interval_s
        self._close_remaining = close_remaining
        self._tasks: set[asyncio.Task[None]] = set()
        self.tracker = OffsetTracker()
        # A fetch's records belong to the assignment it was made under, which ends here.
        self._revocations = 0
        self._metrics = metrics
        self._lag_interval_s = lag_interval_s
        self._lag: dict[TopicPartition, int] = {}
        self._joined = False  # the group has given this consumer an assignment (maybe empty)
        self._running = False

    def status(self) -> tuple[bool, dict[str, object]]:
        """Readiness, and what `/readyz` reports: ready once the loop runs and the group has
        given it an assignment, until it stops. An assignment with no partition (more
        consumers than partitions) is ready too: a standby, alive and polling, that takes
        partitions at the next rebalance; `partitions` says 0."""
        ready = self._running and self._joined
        body: dict[str, object] = {
            "status": "ready" if ready else "not_ready",
            "partitions": len(self._consumer.assignment()) if self._joined else 0,
            "lag": sum(self._lag.values())}
        return ready, body

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set, then drain in-flight work and commit."""
        self._consumer.subscribe([self._topic], listener=_Rebalance(self))
        loop = asyncio.get_running_loop()
        next_commit = loop.time() + self._commit_interval_s
        next_lag = loop.time()
        self._running = True
        poll_ms = max(1, int(self._commit_interval_s * 1000))
        # The poll is awaited in this task, not raced against `stop` in a task of its own:
        # that cost two loop turns per fetch, and let aiokafka send its next fetch before the
        # fetched work had started.
        stopping = asyncio.ensure_future(stop.wait())
        try:
            while not stop.is_set():
                try:
                    # The wait only bounds how late an idle loop commits finished work.
                    fetched = await unless(self._consumer.getmany(
                        timeout_ms=poll_ms, max_records=self._max_in_flight), stopping)
                    # Waiting for a slot (handlers stuck on a service that is down) or on a
                    # commit (a broker that does not answer) must not outlast a stop either.
                    await unless(self._start(fetched), stopping)
                    if loop.time() >= next_commit:
                        await unless(self.commit(), stopping)
                        next_commit = loop.time() + self._commit_interval_s
                    if loop.time() >= next_lag:
                        await self._measure_lag()
                        next_lag = loop.time() + self._lag_interval_s
                except Interrupted:
                    break
        finally:
            self._running = False
            stopping.cancel()
            await self._drain()

    async def revoked(self, partitions: set[TopicPartition]) -> None:
        """Commit what is finished while these are still ours, then let them go. Unfinished
        work on them goes on; its redelivery to the new owner is stopped by the claim."""
        await self.commit()
        self.tracker.forget(partitions)
        self._revocations += 1
        for tp in partitions:
            self._lag.pop(tp, None)
        if self._metrics is not None:
            self._metrics.forget({(tp.topic, tp.partition) for tp in partitions})
            self._metrics.assigned.set(len(self._consumer.assignment()))

    def assigned(self, partitions: set[TopicPartition]) -> None:
        self._joined = True
        if self._metrics is not None:
            self._metrics.assigned.set(len(self._consumer.assignment()))

    async def _measure_lag(self) -> None:
        """High watermark (from the last fetch response) minus the position, per partition
        this consumer holds. A partition not fetched yet has no high watermark: skipped."""
        for tp in self._consumer.assignment():
            highwater = self._consumer.highwater(tp)
            if highwater is None:
                continue
            try:
                # Immediate when the position is known (it is, once fetched); never let a
                # partition being reset hold the poll loop.
                async with asyncio.timeout(0.05):
                    position = await self._consumer.position(tp)
            except (TimeoutError, IllegalStateError):
                continue
            lag = self._lag[tp] = max(highwater - position, 0)
            if self._metrics is not None:
                self._metrics.lag(tp.topic, tp.partition, lag)

    async def _start(self, fetched: dict[TopicPartition, list[Any]]) -> None:
        revocations = self._revocations
        for tp, records in fetched.items():
            for record in records:
                await self._slots.acquire()
                if self._revocations != revocations:
                    # A rebalance while this waited for a slot: the rest is read again, from
                    # the committed offset, by whoever owns the partition now (perhaps this
                    # loop). Starting it here would put stale offsets ahead of that re-read.
                    self._slots.release()
                    return
                self.tracker.start(tp, record.offset)
                task = asyncio.create_task(self._process(tp, record))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    async def _process(self, tp: TopicPartition, record: Any) -> None:
        try:
            await self._settle(record)
        except asyncio.CancelledError:
            # Unfinished: its offset stays uncommitted and the message is redelivered.
            self._slots.release()
            raise
        except Exception:
            # Not even the DLQ took it (Kafka down?): leave the offset uncommitted, so the
            # partition stops committing here and the message is redelivered after restart.
            log.exception("message %s[%d]@%d left unsettled", record.topic, record.partition,
                          record.offset)
            self._slots.release()
            return
        self.tracker.finish(tp, record.offset)
        self._slots.release()

    async def _settle(self, record: Any) -> None:
        try:
            message = self._decode(record.value)
        except (ValidationError, ValueError, TypeError) as exc:
            await self.dead_letter(record, f"undecodable: {exc}", kind="undecodable")
            return
        try:
            await self._handler(message, record)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must not lose the message or stop the loop
            log.exception("handler failed on %s[%d]@%d", record.topic, record.partition,
                          record.offset)
            await self.dead_letter(record, f"handler failed: {exc!r}", kind="handler_failed")

    async def dead_letter(self, record: Any, reason: str, *, kind: str) -> None:
        """Send `record` to `<topic>.dlq` with `reason`; `kind` (one of
        `kafka_metrics.DLQ_REASONS`) is its metrics label."""
        headers = [*(record.headers or ()),
                   (names.H_DLQ_REASON, reason[:2000].encode()),
                   (names.H_DLQ_SOURCE,
                    f"{record.topic}[{record.partition}]@{record.offset}".encode())]
        await self._producer.send_and_wait(
            names.dlq(self._topic), value=record.value, key=record.key, headers=headers)
        log.warning("dead-lettered %s[%d]@%d: %s", record.topic, record.partition,
                    record.offset, reason[:200])
        if self._metrics is not None:
            self._metrics.dead_lettered(record.topic, kind)

    async def commit(self) -> None:
        positions = self.tracker.committable()
        if not positions:
            return
        try:
            if self._metrics is None:
                await self._consumer.commit(positions)
            else:
                with self._metrics.commit.time():
                    await self._consumer.commit(positions)
            self.tracker.committed(positions)
        except (CommitFailedError, KafkaError) as exc:
            # Refused mid-rebalance (the new owner is redelivered the work, and the claims
            # absorb it) or failed outright: the positions are offered again next time.
            log.warning("commit failed (%s); will retry", exc)

    async def _drain(self) -> None:
        if self._tasks:
            log.info("draining %d in-flight messages (grace %.1fs)", len(self._tasks),
                     self._grace_s)
            _, late = await asyncio.wait(set(self._tasks), timeout=self._grace_s)
            for task in late:
                task.cancel()
            if late:
                _, stuck = await asyncio.wait(late, timeout=self._closing_s())
                if stuck:
                    log.warning("%d cancelled messages still unwinding; leaving them",
                                len(stuck))
        try:
            async with asyncio.timeout(self._closing_s()):
                await self.commit()
        except TimeoutError:
            log.warning("last commit: no answer from the broker in time; the uncommitted "
                        "messages are redelivered")

    def _closing_s(self) -> float | None:
        return None if self._close_remaining is None else self._close_remaining()
