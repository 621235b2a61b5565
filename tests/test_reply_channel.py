"""The ingress's reply subscription checks itself with a PING when it has been quiet: an idle
channel stays up (the check is not a loss), and frames still arrive after a quiet spell."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import redis.asyncio as redis

from ingress.replies import ReplyRouter
from topics.messages import encode_frame


async def test_an_idle_reply_channel_is_checked_not_torn_down(r: redis.Redis) -> None:
    replies = ReplyRouter(r, f"test-replies-{uuid.uuid4().hex}", check_s=0.1, answer_s=0.5)
    queue = replies.open("req-1")
    ready = asyncio.Event()
    reader = asyncio.create_task(replies.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), timeout=5)
        for _ in range(30):  # 1.5 s quiet: about 15 checks
            await asyncio.sleep(0.05)
            assert replies.connected
        assert queue.empty()  # no request was failed for a lost channel
        await r.publish(replies.channel, encode_frame("req-1", 0, "meta", b"{}"))
        frame = await asyncio.wait_for(queue.get(), timeout=2)
        assert (frame.seq, frame.kind) == (0, "meta")
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
