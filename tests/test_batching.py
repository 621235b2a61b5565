"""Micro-batching: what arrives in one turn of the event loop is handled by one call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from workers.batching import MicroBatcher


async def test_submissions_of_one_loop_turn_share_one_call_and_get_their_own_result() -> None:
    calls: list[list[str]] = []

    def shout(items: Sequence[str]) -> list[str]:
        calls.append(list(items))
        return [item.upper() for item in items]

    batcher: MicroBatcher[str, str] = MicroBatcher(shout, max_batch=100)
    results = await asyncio.gather(*(batcher.submit(w) for w in ("a", "b", "c")))

    assert results == ["A", "B", "C"]
    assert calls == [["a", "b", "c"]]


async def test_a_full_batch_leaves_at_once() -> None:
    calls: list[int] = []

    def count(items: Sequence[int]) -> list[int]:
        calls.append(len(items))
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(count, max_batch=2)
    assert await asyncio.gather(*(batcher.submit(i) for i in range(5))) == [0, 1, 2, 3, 4]
    assert calls == [2, 2, 1]


async def test_a_failing_batch_fails_every_waiter_and_the_next_batch_works() -> None:
    fail = True

    def flaky(items: Sequence[int]) -> list[int]:
        if fail:
            raise RuntimeError("model crashed")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(flaky, max_batch=10)
    outcomes = await asyncio.gather(batcher.submit(1), batcher.submit(2),
                                    return_exceptions=True)
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    fail = False
    assert await batcher.submit(3) == 3


async def test_a_result_count_mismatch_is_an_error_not_a_wrong_answer() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [], max_batch=10)
    with pytest.raises(ValueError, match="got 0 results"):
        await batcher.submit(1)
