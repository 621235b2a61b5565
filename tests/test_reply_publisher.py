"""The router's reply publisher on the session stack's real Redis: what the client waits for
leaves at once; follow-on stream chunks wait for company, at most one flush interval, and
leave in one message with whatever else is pending, in order. A request's frame writer holds
its `meta` for the frame that follows it."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer

from compose.stack import LocalStack
from state.pubsub import close_pubsub
from topics.kafka import make_producer
from topics.messages import ReplyFrame, ReplyTarget, encode_frame, parse_frames
from workers.router.frames import FrameWriter
from workers.router.publisher import ReplyPublisher

# Far longer than any message takes to arrive: a frame seen before it did not wait for it.
LONG_S = 5.0


class Channel:
    """A subscribed reply channel: each Redis message as the list of frames it carries."""

    def __init__(self, client: redis.Redis) -> None:
        self.name = f"test-reply-{uuid.uuid4().hex[:10]}"
        self._pubsub = client.pubsub(ignore_subscribe_messages=True)

    async def __aenter__(self) -> Channel:
        await self._pubsub.subscribe(self.name)
        return self

    async def __aexit__(self, *_: object) -> None:
        await close_pubsub(self._pubsub)

    async def message(self, within_s: float = 2.0) -> list[ReplyFrame]:
        async with asyncio.timeout(within_s):
            while True:
                got = await self._pubsub.get_message(timeout=within_s)
                if got is not None:
                    return parse_frames(got["data"])

    async def seqs(self) -> list[int]:
        return [frame.seq for frame in await self.message()]


def frame(seq: int) -> bytes:
    return encode_frame("req-1", seq, "chunk", b"{}")


async def test_what_the_client_waits_for_leaves_at_once(r: redis.Redis) -> None:
    async with Channel(r) as channel, ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
        publisher.publish(channel.name, frame(0))
        assert await channel.seqs() == [0]
        publisher.publish(channel.name, frame(1))  # urgent, though a flush just happened
        assert await channel.seqs() == [1]


async def test_follow_on_chunks_wait_for_company_and_leave_together(r: redis.Redis) -> None:
    async with Channel(r) as channel, ReplyPublisher(r, flush_interval_s=0.3) as publisher:
        publisher.publish(channel.name, frame(0))
        assert await channel.seqs() == [0]
        for n in (1, 2, 3):
            publisher.publish(channel.name, frame(n), urgent=False)
        assert await channel.seqs() == [1, 2, 3]


async def test_a_chunk_after_a_quiet_spell_does_not_wait(r: redis.Redis) -> None:
    async with Channel(r) as channel, ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
        publisher.publish(channel.name, frame(7), urgent=False)  # nothing flushed for ages
        assert await channel.seqs() == [7]


async def test_an_urgent_frame_takes_the_waiting_chunks_with_it_in_order(
        r: redis.Redis) -> None:
    async with Channel(r) as channel, ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
        publisher.publish(channel.name, frame(0))
        assert await channel.seqs() == [0]
        publisher.publish(channel.name, frame(1), urgent=False)
        publisher.publish(channel.name, frame(2), urgent=False)
        publisher.publish(channel.name, frame(3))  # the done frame
        assert await channel.seqs() == [1, 2, 3]


async def test_chunks_still_waiting_at_shutdown_are_published(r: redis.Redis) -> None:
    async with Channel(r) as channel:
        async with ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
            publisher.publish(channel.name, frame(0))
            assert await channel.seqs() == [0]
            publisher.publish(channel.name, frame(1), urgent=False)
        assert await channel.seqs() == [1]


async def test_frames_for_several_ingresses_leave_in_one_flush(r: redis.Redis) -> None:
    async with Channel(r) as a, Channel(r) as b, \
            ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
        publisher.publish(a.name, frame(0))
        assert await a.seqs() == [0]
        publisher.publish(a.name, frame(1), urgent=False)
        publisher.publish(b.name, frame(2))
        assert await a.seqs() == [1]
        assert await b.seqs() == [2]


@pytest.fixture
async def producer(stack: LocalStack) -> AsyncIterator[AIOKafkaProducer]:
    """Only for the frame writer's signature: a channel reply never touches Kafka."""
    client = make_producer(stack.settings.kafka)
    await client.start()
    yield client
    await client.stop()

MAX_BYTES = 100_000  # kafka.max_message_bytes, small here


async def test_meta_leaves_with_the_frame_after_it_in_one_message(
        r: redis.Redis, producer: AIOKafkaProducer) -> None:
    async with Channel(r) as channel, ReplyPublisher(r, flush_interval_s=LONG_S) as publisher:
        whole = FrameWriter("req-whole", ReplyTarget(channel=channel.name), publisher, producer,
                            max_bytes=MAX_BYTES)
        await whole.send("meta", {"provider": "p"})
        await whole.send("done", {"completion": {}})
        assert [(f.kind, f.seq) for f in await channel.message()] == [("meta", 0), ("done", 1)]

        streamed = FrameWriter("req-stream", ReplyTarget(channel=channel.name), publisher,
                               producer, max_bytes=MAX_BYTES)
        await streamed.send("meta", {"provider": "p"})
        await streamed.chunk({"n": 0})
        await streamed.chunk({"n": 1})
        frames = await channel.message()
        assert [f.kind for f in frames] == ["meta", "chunk", "chunk"]
        assert [f.data for f in frames] == [{"provider": "p"}, {"n": 0}, {"n": 1}]


async def test_a_flush_redis_refuses_is_tried_again_in_order(r: redis.Redis) -> None:
    """Redis restarting under the router: the frames wait and leave once it answers again,
    the failed ones first."""
    real_publish = r.publish
    refusals = 2

    async def flaky_publish(channel: str, message: bytes) -> int:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise redis.ConnectionError("Connection refused (injected)")
        return await real_publish(channel, message)

    r.publish = flaky_publish  # type: ignore[assignment]
    async with Channel(r) as channel, ReplyPublisher(r) as publisher:
        publisher.publish(channel.name, frame(0))
        await asyncio.sleep(0.01)  # the first flush fails; frame 1 queues behind frame 0
        publisher.publish(channel.name, frame(1))
        received: list[int] = []
        while len(received) < 2:
            received += await channel.seqs()
    assert received == [0, 1]
    assert refusals == 0


async def test_an_answer_over_the_message_limit_becomes_an_error_frame(
        r: redis.Redis, producer: AIOKafkaProducer) -> None:
    async with Channel(r) as channel, ReplyPublisher(r) as publisher:
        out = FrameWriter("req-huge", ReplyTarget(channel=channel.name), publisher, producer,
                          max_bytes=MAX_BYTES)
        await out.send("meta", {"provider": "p"})
        await out.send("done", {"completion": {"text": "x" * MAX_BYTES}})
        frames = await channel.message()
        assert [(f.kind, f.seq) for f in frames] == [("meta", 0), ("error", 1)]
        assert frames[1].data["code"] == "response_too_large"
