"""Reply frames as a Redis reply channel carries them from a router to an ingress: a batch of
frames in one message, chunk bytes relayed exactly as the router encoded them, and anything
malformed refused rather than half-read."""

from __future__ import annotations

import asyncio

import orjson
import pytest

from ingress.replies import FrameStream
from topics.errors import UpstreamError
from topics.messages import ReplyFrame, encode_frame, parse_frames


def test_a_message_carries_its_frames_in_order_with_chunk_bytes_verbatim() -> None:
    chunk = orjson.dumps({"choices": [{"delta": {"content": "naïve 🙂 \n \"quoted\""}}]})
    message = b"".join([
        encode_frame("req-1", 0, "meta", b'{"provider":"openai"}'),
        encode_frame("req-1", 1, "chunk", chunk),
        encode_frame("req-2", 7, "progress", b'{"answered":1}'),
        encode_frame("req-1", 2, "done", b'{"usage":{"total_tokens":3}}'),
    ])
    frames = parse_frames(message)
    assert [(f.request_id, f.seq, f.kind) for f in frames] == [
        ("req-1", 0, "meta"), ("req-1", 1, "chunk"), ("req-2", 7, "progress"),
        ("req-1", 2, "done")]
    assert frames[1].raw == chunk
    assert frames[1].data == orjson.loads(chunk)
    assert frames[0].data == {"provider": "openai"}
    assert frames[3].data == {"usage": {"total_tokens": 3}}


@pytest.mark.parametrize("message", [
    pytest.param(b"", id="empty message"),
    pytest.param(b'{"request_id":"r","seq":0,"kind":"chunk","data":{}}', id="a JSON frame"),
    pytest.param(b"req-1 0 chunk\n{}", id="header without a length"),
    pytest.param(b"req-1 -1 chunk 2\n{}", id="negative seq"),
    pytest.param(b"req-1 0 reply 2\n{}", id="unknown kind"),
    pytest.param(b"req-1 0 chunk 9\n{}", id="cut short"),
    pytest.param(b"req-1 0 done 2\n[]", id="done data not an object"),
    pytest.param(b"req-1 0 error 2\n{x", id="error data not JSON"),
    pytest.param(encode_frame("req-1", 0, "chunk", b"{}") + b"trailing", id="trailing bytes"),
])
def test_malformed_messages_are_refused_whole(message: bytes) -> None:
    with pytest.raises(ValueError, match="reply"):
        parse_frames(message)


def _frames(*seqs: int, kind: str = "chunk") -> list[ReplyFrame]:
    return [ReplyFrame("r", seq, kind, b"{}", {}) for seq in seqs]  # type: ignore[arg-type]


async def test_a_frame_published_twice_is_relayed_once() -> None:
    """A router's publish that timed out while Redis was paused is sent again, and Redis runs
    both once it is back: the ingress drops what it has already relayed."""
    queue: asyncio.Queue[ReplyFrame] = asyncio.Queue()
    for frame in _frames(0, 1, 2, 1, 2, 3):
        queue.put_nowait(frame)
    stream = FrameStream(queue, deadline=asyncio.get_running_loop().time() + 5)
    assert [(await stream.next()).seq for _ in range(4)] == [0, 1, 2, 3]
    assert stream.next_ready() is None


async def test_a_frame_missing_is_a_reply_gap() -> None:
    queue: asyncio.Queue[ReplyFrame] = asyncio.Queue()
    for frame in _frames(0, 2):
        queue.put_nowait(frame)
    stream = FrameStream(queue, deadline=asyncio.get_running_loop().time() + 5)
    assert (await stream.next()).seq == 0
    with pytest.raises(UpstreamError) as lost:
        await stream.next()
    assert lost.value.code == "reply_gap"
