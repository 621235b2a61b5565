"""Reply frames of one request, numbered without gaps, to the ingress's Redis channel (via
the process's batching ReplyPublisher) or to a Kafka reply topic (batch producers).

The last frame (`done` or `error`) carries the request's bill, so that an answer the client
has is never left unbilled by a router that dies before writing its usage events: on a
channel, its publish and the claim's change to answered-with-this-bill are one atomic Redis
operation (`state/claims.py` `Claims.answered`); to a reply topic, the usage events are made
durable before the frame is produced (batch work is not waiting on the milliseconds)."""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import orjson
from aiokafka import AIOKafkaProducer
from opentelemetry.context import get_current

from state.claims import Claims
from topics.errors import SwitchyardError, UpstreamError
from topics.messages import FrameKind, ReplyTarget, UsageEvent, encode_frame
from topics.tracing import Span, SpanKind, Tracing
from workers.router.publisher import ReplyPublisher


class Books(Protocol):
    """The request's usage so far (`workers/router/attempt.py` `AttemptRunner`)."""

    def bill(self, request_id: str) -> list[UsageEvent]: ...

    async def bill_durable(self, request_id: str) -> None: ...


class FrameWriter:
    def __init__(self, request_id: str, reply: ReplyTarget, publisher: ReplyPublisher,
                 producer: AIOKafkaProducer, *, max_bytes: int, books: Books | None = None,
                 claims: Claims | None = None, tracing: Tracing | None = None) -> None:
        self._request_id = request_id
        self._max_bytes = max_bytes  # kafka.max_message_bytes: the reply topic's limit
        self._reply = reply
        self._publisher = publisher
        self._producer = producer
        self._seq = 0
        self._meta: bytes | None = None  # held until the frame after it
        self._chunked = False  # a chunk has gone out
        # Both or neither: without them (framing alone) no frame carries a bill.
        self._books = books
        self._claims = claims
        self._billed: asyncio.Future[None] | None = None  # the bill's write is in Redis
        self._tracing = tracing
        # Made where the request is handled: the reply's span is the request's child, not
        # the child of whichever attempt sends the first frame.
        self._parent = get_current() if tracing is not None and tracing.on else None
        # From the first frame to the last: the reply's publish, under the request's span.
        self._span: Span | None = None
        self.ended: FrameKind | None = None  # done or error, once the last frame is sent

    async def send(self, kind: FrameKind, data: dict[str, Any]) -> None:
        if self._tracing is None or not self._tracing.on:
            await self._send(kind, data)
            return
        if self._span is None:
            self._span = self._tracing.start(
                "reply publish", kind=SpanKind.PRODUCER, parent=self._parent, attributes={
                "messaging.system": "redis" if self._reply.channel is not None else "kafka",
                "messaging.destination.name": self._reply.channel or self._reply.topic or ""})
        span = self._span
        try:
            await self._send(kind, data)
        finally:
            if kind in ("done", "error"):
                span.set_attributes({"switchyard.reply.frames": self._seq,
                                     "switchyard.reply.last": kind})
                span.end()

    async def _send(self, kind: FrameKind, data: dict[str, Any]) -> None:
        frame = self._encode(kind, data)
        if len(frame) > self._max_bytes:
            # An answer (a long completion, the embeddings of many inputs) that no reply
            # topic would take, nor Redis relay whole: the client hears why, not a lost reply.
            kind = "error"
            frame = self._encode(kind, UpstreamError(
                f"the answer is {len(frame)} bytes, more than the gateway relays "
                f"({self._max_bytes}, SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES)",
                code="response_too_large", retryable=False).to_frame_data())
        self._seq += 1
        if kind == "meta":
            # Nobody waits on `meta` alone: it leaves with the frame after it (the first
            # chunk, or a whole answer's `done`), in the same publish.
            self._meta = frame
            return
        held, self._meta = self._meta, None
        last = kind in ("done", "error")
        if last:
            self.ended = kind
        if self._reply.channel is not None:
            # Only a follow-on chunk may wait for company: the first is the client's TTFT.
            urgent = kind != "chunk" or not self._chunked
            self._chunked = self._chunked or kind == "chunk"
            if held is not None:
                self._publisher.publish(self._reply.channel, held, urgent=urgent)
            write = None
            if last and self._books is not None and self._claims is not None:
                events = self._books.bill(self._request_id)
                if events:
                    write = self._claims.answered(self._request_id, events)
            billed = self._publisher.publish(self._reply.channel, frame, urgent=urgent,
                                             write=write)
            if billed is not None:
                self._billed = billed
            return
        assert self._reply.topic is not None
        key = self._request_id.encode()
        if last and self._books is not None:
            await self._books.bill_durable(self._request_id)
        # Same key, same partition, idempotent producer: order is kept.
        if held is not None:
            await self._producer.send(self._reply.topic, held, key=key)
        if last:
            await self._producer.send_and_wait(self._reply.topic, frame, key=key)
        else:
            await self._producer.send(self._reply.topic, frame, key=key)

    async def bill_published(self) -> None:
        """Wait until the last frame that carried the bill is in Redis (or was given up on
        with it). Usage events produced only then never bill an answer that a router killed
        before its publish left unsent."""
        if self._billed is not None:
            await asyncio.shield(self._billed)

    def _encode(self, kind: FrameKind, data: dict[str, Any]) -> bytes:
        # A channel frame carries the data's JSON after a header line, so that the ingress
        # relays a chunk without parsing it; a reply topic gets one JSON message per frame.
        if self._reply.channel is not None:
            return encode_frame(self._request_id, self._seq, kind, orjson.dumps(data))
        return orjson.dumps({"request_id": self._request_id, "seq": self._seq,
                             "kind": kind, "data": data})

    async def chunk(self, chunk: dict[str, Any]) -> None:
        await self.send("chunk", chunk)

    async def error(self, exc: SwitchyardError) -> None:
        await self.send("error", exc.to_frame_data())
