"""How the router reads a provider's server-sent events: whatever the network hands over in one
read, complete events come out, and nothing is lost at a read boundary."""

from __future__ import annotations

import pytest

from workers.providers.base import SseEvent, SseParser

STREAM = (b": keep-alive comment\r\n"
          b"event: message_start\r\n"
          b"data: {\"a\": 1}\r\n"
          b"\r\n"
          b"data: {\"b\":\r\n"
          b"data: 2}\r\n"
          b"id: 7\r\n"
          b"\r\n"
          b"data: [DONE]\r\n"
          b"\r\n")
EXPECTED = [SseEvent("message_start", b'{"a": 1}'), SseEvent(None, b'{"b":\n2}'),
            SseEvent(None, b"[DONE]")]


def _read_in(pieces: list[bytes]) -> list[SseEvent]:
    parser = SseParser()
    events = [event for piece in pieces for event in parser.feed(piece)]
    return events + parser.end()


def test_one_read_carrying_many_events_gives_them_all_in_order() -> None:
    assert _read_in([STREAM]) == EXPECTED


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 16])
def test_events_split_at_any_byte_come_out_whole(size: int) -> None:
    pieces = [STREAM[i:i + size] for i in range(0, len(STREAM), size)]
    assert _read_in(pieces) == EXPECTED


def test_an_event_is_held_until_its_blank_line() -> None:
    parser = SseParser()
    assert parser.feed(b"data: {\"x\": 1}\n") == []
    assert parser.feed(b"\n") == [SseEvent(None, b'{"x": 1}')]


def test_a_body_ending_without_its_last_newlines_still_gives_its_event() -> None:
    assert _read_in([b"data: tail"]) == [SseEvent(None, b"tail")]
    assert _read_in([b"data: tail\n"]) == [SseEvent(None, b"tail")]


def test_unix_newlines_read_like_crlf() -> None:
    assert _read_in([STREAM.replace(b"\r\n", b"\n")]) == EXPECTED
