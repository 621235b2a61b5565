"""What every model route does after validation: publish the request durably to Kafka, wait
for its first answer on this process's reply channel, and cancel it when the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import anyio
import orjson
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from starlette.requests import Request

from ingress.bodies import read_body
from ingress.metrics import IngressMetrics
from ingress.replies import FrameStream, ReplyRouter
from ingress.validation import parse_json_object
from state.claims import publish_cancel
from state.runtime import OUTAGE_RETRY_AFTER_S
from topics import names
from topics.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    SwitchyardError,
    Unavailable,
    Unprocessable,
)
from topics.identity import Principal
from topics.messages import Endpoint, ReplyFrame
from topics.settings import IngressSettings
from topics.tasks import Interrupted, unless
from topics.tracing import Span, SpanKind, Tracing, current_traceparent

TIMEOUT_HEADER = "x-switchyard-timeout-ms"
# Frames may trail the router's own deadline handling by a little; wait that much longer so
# the router's precise error, not a generic timeout, reaches the client.
_DEADLINE_SLACK_S = 1.0
# Errors after which a queued request is told to stop (a router that has not started it
# skips it), and the reason given.
_CANCEL_ON = {"deadline_exceeded": "deadline_exceeded", "reply_channel_lost": "reply_lost",
              "queue_unavailable": "queue_unavailable"}
# How long a produce may wait for the broker's ack: the producer's request timeout
# (topics/kafka.py). aiokafka does not bound a send whose broker is unreachable by it (the
# batch waits for metadata), so the wait is bounded here; a request refused so may still
# reach the queue later, and the cancel then makes a router skip it.
_PRODUCE_TIMEOUT_S = 10.0
_PUBLISH = {"messaging.system": "kafka", "messaging.operation.type": "send",
            "messaging.destination.name": names.REQUESTS}


@dataclass(frozen=True, slots=True)
class Submission:
    request_id: str
    owner: Principal
    endpoint: Endpoint
    body: dict[str, Any]
    routing: dict[str, Any]
    metadata: dict[str, Any] | None
    timeout_s: float
    traceparent: str | None
    category: str | None = None  # the client's hint: the classifier stage then skips it
    # Completes when the client disconnects: every attempt in flight is then cancelled.
    client_gone: Callable[[], Awaitable[object]] | None = None
    admitted: bool = False  # counted by the rate limits already (`ingress/admission.py`)


class Pipeline:
    def __init__(self, *, settings: IngressSettings, producer: AIOKafkaProducer,
                 redis_client: redis.Redis, replies: ReplyRouter,
                 metrics: IngressMetrics, max_message_bytes: int,
                 tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing()
        self._max_message_bytes = max_message_bytes  # kafka.max_message_bytes
        self._producer = producer
        self._redis = redis_client
        self._replies = replies
        self._metrics = metrics

    async def submit(self, job: Submission) -> tuple[ReplyFrame, FrameStream]:
        """Publish `job` and wait for its first answer (an error frame is raised). Waiting
        lets a provider that fails before its first token get a proper HTTP status instead
        of a 200 stream that ends in an error. The caller closes the stream's reply slot."""
        if not self._replies.connected:
            # Its answer would have nowhere to arrive: refused before anything is queued.
            raise Unavailable("the gateway's reply channel (Redis) is down; try again shortly",
                              code="reply_channel_unavailable", retry_after_s=OUTAGE_RETRY_AFTER_S)
        deadline = asyncio.get_running_loop().time() + job.timeout_s + _DEADLINE_SLACK_S
        stream = FrameStream(self._replies.open(job.request_id), deadline)
        try:
            await self._publish(job)
            with self.tracing.span("reply wait", kind=SpanKind.CONSUMER, attributes={
                    "messaging.system": "redis",
                    "messaging.destination.name": self._replies.channel}):
                first = await _unless_gone(stream.first_answer(), job.client_gone)
            if first.kind == "error":
                raise SwitchyardError.from_frame_data(first.data)
        except BaseException as exc:
            self.close(job.request_id)
            if isinstance(exc, SwitchyardError) and exc.code in _CANCEL_ON:
                await self.cancel(job.request_id, _CANCEL_ON[exc.code])
            elif isinstance(exc, ClientClosedRequest):
                await self.cancel(job.request_id, "client_disconnected")
            raise
        return first, stream

    def close(self, request_id: str) -> None:
        self._replies.close(request_id)

    async def end_relay(self, request_id: str, span: Span, last_kind: str,
                        finished: bool) -> None:
        """What every streamed relay (chat completions, messages, responses) does when it
        ends, however it ends: its span closed, its reply stream dropped, and, if the client
        left before the answer's end, the router told to stop (shielded: the relay is being
        cancelled itself)."""
        if span.is_recording():
            span.set_attributes({"switchyard.reply.last": last_kind,
                                 "switchyard.reply.finished": finished})
            span.end()
        self.close(request_id)
        if not finished:
            with anyio.CancelScope(shield=True):
                await self.cancel(request_id, "client_disconnected")

    async def cancel(self, request_id: str, reason: str) -> None:
        self._metrics.cancels.labels(reason).inc()
        # If Redis is down the request's deadline still bounds the wasted work.
        with contextlib.suppress(redis.RedisError):
            await publish_cancel(self._redis, request_id, reason, ttl_s=3600)

    async def _publish(self, job: Submission) -> None:
        received_ms = int(time.time() * 1000)
        envelope = orjson.dumps({
            "schema_version": 1, "request_id": job.request_id,
            "tenant_id": job.owner.tenant_id, "key_id": job.owner.key_id,
            "received_at_ms": received_ms,
            "deadline_ms": received_ms + int(job.timeout_s * 1000),
            "endpoint": job.endpoint, "body": job.body, "routing": job.routing,
            # Admitted here (limits and budgets checked): the router does not check again.
            "metadata": job.metadata, "category": job.category, "admitted": job.admitted,
            "reply": {"channel": self._replies.channel},
        })
        if len(envelope) > self._max_message_bytes:
            # The body was within its limit but its envelope is not (re-serialised JSON can
            # grow, e.g. `1e5` becomes `100000.0`): the client's to fix, not an outage.
            raise PayloadTooLarge(
                f"the request is {len(envelope)} bytes once queued, more than the "
                f"{self._max_message_bytes} the request queue takes",
                code="request_too_large")
        headers = [(names.H_REQUEST_ID, job.request_id.encode()),
                   (names.H_TENANT_ID, job.owner.tenant_id.encode()),
                   (names.H_CONTENT_TYPE, names.CONTENT_TYPE_JSON)]
        try:
            with self.tracing.span(f"{names.REQUESTS} publish", kind=SpanKind.PRODUCER,
                                   attributes=_PUBLISH):
                # The router's consume span is this one's child; off, the request's
                # traceparent as the ingress made it (its logs share the trace id).
                traceparent = current_traceparent() or job.traceparent
                if traceparent:
                    headers.append((names.H_TRACEPARENT, traceparent.encode()))
                # Awaited to the broker's ack: once we answer anything, the request is
                # durable.
                async with asyncio.timeout(min(_PRODUCE_TIMEOUT_S, job.timeout_s)):
                    await self._producer.send_and_wait(names.REQUESTS, envelope,
                                                       key=job.request_id.encode(),
                                                       headers=headers)
        except (KafkaError, TimeoutError) as exc:
            raise Unavailable(f"the request queue is unavailable: {exc!r}",
                              code="queue_unavailable", retry_after_s=OUTAGE_RETRY_AFTER_S) from exc

    async def read_json(self, request: Request) -> dict[str, Any]:
        """A model route's body as a JSON object, within the ingress's body limit."""
        return parse_json_object(await read_body(request, self.settings.max_body_bytes))

    def timeout_s(self, request: Request, policy_timeout_ms: int | None) -> float:
        """The request's deadline: the header, else the policy's timeout_ms, else the default."""
        raw = request.headers.get(TIMEOUT_HEADER)
        limit_ms = int(self.settings.max_deadline_s * 1000)
        if raw is None:
            if policy_timeout_ms is None:
                return self.settings.default_deadline_s
            if policy_timeout_ms > limit_ms:  # a body field: its type was checked already
                raise Unprocessable(f"policy.timeout_ms: must be within (0, {limit_ms}]",
                                    code="invalid_field", param="policy.timeout_ms")
            return policy_timeout_ms / 1000
        try:
            value = float(raw) / 1000
        except ValueError:
            raise InvalidRequest(f"{TIMEOUT_HEADER} must be a number of milliseconds",
                                 code="invalid_header", param=TIMEOUT_HEADER) from None
        if not 0 < value <= self.settings.max_deadline_s:
            raise InvalidRequest(f"{TIMEOUT_HEADER} must be within (0, {limit_ms}]",
                                 code="invalid_header", param=TIMEOUT_HEADER)
        return value


async def _unless_gone(answer: Coroutine[Any, Any, ReplyFrame],
                       client_gone: Callable[[], Awaitable[object]] | None) -> ReplyFrame:
    """The answer, unless the client leaves first (then ClientClosedRequest). The answer is
    awaited in the caller's own task (`topics.tasks.unless`): one wake-up fewer between its
    first frame's arrival and the response."""
    if client_gone is None:
        return await answer
    leaving = asyncio.ensure_future(client_gone())
    try:
        return await unless(answer, leaving)
    except Interrupted:
        raise ClientClosedRequest("the client disconnected before its answer") from None
    finally:
        leaving.cancel()


def request_traceparent(request: Request) -> str | None:
    """The request's `traceparent` as `ingress/middleware.py` made it: its server span's, or
    its made-up ids when tracing is off (not the client's header, which is its parent)."""
    value: str | None = request.scope.get("state", {}).get("traceparent")
    return value


async def client_gone(request: Request) -> None:
    """Returns once the client has disconnected (the body must have been read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
