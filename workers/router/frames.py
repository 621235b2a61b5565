"""Reply frames of one request, numbered without gaps, to a Redis channel or a Kafka topic."""

from __future__ import annotations

from typing import Any

import orjson
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer

from topics.errors import SwitchyardError
from topics.messages import FrameKind, ReplyTarget


class FrameWriter:
    def __init__(self, request_id: str, reply: ReplyTarget, redis_client: redis.Redis,
                 producer: AIOKafkaProducer) -> None:
        self._request_id = request_id
        self._reply = reply
        self._redis = redis_client
        self._producer = producer
        self._seq = 0

    @property
    def sent(self) -> int:
        return self._seq

    async def send(self, kind: FrameKind, data: dict[str, Any]) -> None:
        # Built as a plain dict: this is the hot path, and ReplyFrame validates on the reader.
        frame = orjson.dumps({"request_id": self._request_id, "seq": self._seq, "kind": kind,
                              "data": data})
        self._seq += 1
        if self._reply.channel is not None:
            await self._redis.publish(self._reply.channel, frame)
        else:
            assert self._reply.topic is not None
            key = self._request_id.encode()
            if kind in ("done", "error"):
                await self._producer.send_and_wait(self._reply.topic, frame, key=key)
            else:  # same key, same partition, idempotent producer: order is kept
                await self._producer.send(self._reply.topic, frame, key=key)

    async def error(self, exc: SwitchyardError) -> None:
        await self.send("error", exc.to_frame_data())
