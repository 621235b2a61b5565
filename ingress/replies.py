"""One Redis pub/sub reader per ingress process, on its own channel; frames are handed to
per-request queues. Nothing subscribes per request.

Redis pub/sub keeps nothing for a subscriber that is away: frames published while the channel
is down are gone. So when the subscription is lost, every request waiting on this process is
failed at once with 503 `reply_channel_lost` (its answer may already have been published
into the void; `Retry-After` says when to try again), instead of waiting for its deadline;
and until the channel is back, new requests are refused with 503
`reply_channel_unavailable` before anything is queued (`ingress/pipeline.py`).

The subscription is kept and checked by `state/pubsub.py`: a Redis that stops answering
without closing the connection (paused, partitioned) is noticed within `check_s + answer_s`
(a PING after `check_s` of silence, unanswered for `answer_s`); an idle channel costs one
PING per `check_s` and is never torn down for being idle."""

from __future__ import annotations

import asyncio
import logging

import orjson
import redis.asyncio as redis

from ingress.metrics import IngressMetrics
from state.pubsub import Subscription
from state.runtime import OUTAGE_RETRY_AFTER_S
from topics.errors import GatewayTimeout, Unavailable, UpstreamError
from topics.messages import ReplyFrame, parse_frames

log = logging.getLogger(__name__)


class ReplyRouter:
    def __init__(self, client: redis.Redis, channel: str, *, check_s: float = 1.0,
                 answer_s: float = 2.0, metrics: IngressMetrics | None = None) -> None:
        self.channel = channel
        self._metrics = metrics
        if metrics is not None:
            metrics.watch_reply_channel(lambda: self.connected)
        self._queues: dict[str, asyncio.Queue[ReplyFrame]] = {}
        self._subscription = Subscription(client, channel, self._dispatch, check_s=check_s,
                                          answer_s=answer_s, on_lost=self._lost)

    @property
    def connected(self) -> bool:
        """Subscribed now: frames published for us reach us."""
        return self._subscription.connected

    def open(self, request_id: str) -> asyncio.Queue[ReplyFrame]:
        queue: asyncio.Queue[ReplyFrame] = asyncio.Queue()
        self._queues[request_id] = queue
        return queue

    def close(self, request_id: str) -> None:
        self._queues.pop(request_id, None)

    async def run(self, ready: asyncio.Event) -> None:
        """Read frames until cancelled; after a Redis error, fail the requests waiting (their
        frames may be lost) and subscribe again."""
        await self._subscription.run(ready)

    def _lost(self, exc: BaseException) -> None:
        failed = self._fail_waiting()
        if self._metrics is not None:
            self._metrics.reply_channel_losses.inc()
        log.warning("reply channel lost (%s); %d waiting requests failed", exc, failed)

    def _fail_waiting(self) -> int:
        error = Unavailable("the gateway lost its reply channel (Redis) while this request "
                            "was waiting; its answer may be lost", code="reply_channel_lost",
                            retry_after_s=OUTAGE_RETRY_AFTER_S)
        raw = orjson.dumps(error.to_frame_data())
        for request_id, queue in self._queues.items():
            # An error frame is taken whatever its seq (FrameStream._check).
            queue.put_nowait(ReplyFrame(request_id, -1, "error", raw))
        return len(self._queues)

    def _dispatch(self, raw: bytes) -> None:
        try:
            frames = parse_frames(raw)
        except ValueError as exc:
            log.warning("dropped a malformed reply message: %s", exc)
            return
        for frame in frames:
            queue = self._queues.get(frame.request_id)
            if queue is not None:  # absent: the client has gone and the request was cancelled
                queue.put_nowait(frame)


class FrameStream:
    """The frames of one request, in order. A gap in `seq` or silence past `deadline` (loop
    time) raises instead of ending quietly. An `error` frame is taken whatever its `seq`: it
    ends the reply with a failure either way, and it may come from a worker that took over
    from a dead one and cannot know how many frames were sent before."""

    def __init__(self, queue: asyncio.Queue[ReplyFrame], deadline: float) -> None:
        self._queue = queue
        self._deadline = deadline
        self._expected = 0

    async def next(self) -> ReplyFrame:
        while True:
            if self._queue.empty():
                try:
                    async with asyncio.timeout_at(self._deadline):
                        frame = await self._queue.get()
                except TimeoutError:
                    raise GatewayTimeout("no answer before the request's deadline",
                                         code="deadline_exceeded") from None
            else:  # the common case under load: no timer to arm and disarm
                frame = self._queue.get_nowait()
            if not self._repeated(frame):
                return self._check(frame)

    def next_ready(self) -> ReplyFrame | None:
        """The next frame if it has already arrived, else None."""
        while not self._queue.empty():
            frame = self._queue.get_nowait()
            if not self._repeated(frame):
                return self._check(frame)
        return None

    def _repeated(self, frame: ReplyFrame) -> bool:
        """A frame already relayed, arriving again: a router's publish that timed out while
        Redis was paused is sent again (`workers/router/publisher.py`), and Redis, once it
        runs again, executes both. The same frame, the same `seq`: dropped."""
        return frame.seq < self._expected and frame.kind != "error"

    def _check(self, frame: ReplyFrame) -> ReplyFrame:
        if frame.seq != self._expected and frame.kind != "error":
            raise UpstreamError(f"reply frames lost (expected #{self._expected}, got "
                                f"#{frame.seq}); the answer would be incomplete",
                                code="reply_gap")
        self._expected += 1
        return frame

    async def first_answer(self) -> ReplyFrame:
        """The first frame past `meta`: an error, a done, the first chunk, or progress (work
        under way that a streaming client should hear about before the answer)."""
        frame = await self.next()
        while frame.kind == "meta":
            frame = await self.next()
        return frame
