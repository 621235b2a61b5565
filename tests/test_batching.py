"""Micro-batching: what arrives in one turn of the event loop is handled by one call; blocking
work (the prompt encoder) runs in a thread, batched over what queued while it ran."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import pytest

from workers.batching import MicroBatcher, ThreadBatcher


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


async def test_what_queues_while_the_thread_runs_is_the_next_batch() -> None:
    release, started = threading.Event(), threading.Event()
    calls: list[list[int]] = []

    def slow(items: Sequence[int]) -> list[int]:
        calls.append(list(items))
        if len(calls) == 1:
            started.set()
            release.wait(10)  # the first call blocks its thread, not the loop
        return [i * 10 for i in items]

    batcher: ThreadBatcher[int, int] = ThreadBatcher(slow, max_batch=3)
    first = asyncio.create_task(batcher.submit(1))
    assert await asyncio.to_thread(started.wait, 10)
    # The loop keeps turning while the first call blocks: five more arrive meanwhile.
    rest = [asyncio.create_task(batcher.submit(i)) for i in range(2, 7)]
    await asyncio.sleep(0.05)
    assert calls == [[1]]
    assert not first.done()
    release.set()
    assert await asyncio.gather(first, *rest) == [10, 20, 30, 40, 50, 60]
    assert calls == [[1], [2, 3, 4], [5, 6]]  # at most max_batch a call


async def test_a_failing_thread_call_fails_its_waiters_and_the_next_call_works() -> None:
    def flaky(items: Sequence[int]) -> list[int]:
        if 0 in items:
            raise RuntimeError("model crashed")
        return list(items)

    batcher: ThreadBatcher[int, int] = ThreadBatcher(flaky, max_batch=10)
    with pytest.raises(RuntimeError, match="model crashed"):
        await batcher.submit(0)
    assert await batcher.submit(7) == 7
    wrong: ThreadBatcher[int, int] = ThreadBatcher(lambda items: [], max_batch=10)
    with pytest.raises(ValueError, match="got 0 results"):
        await wrong.submit(1)


async def test_a_cancelled_worker_leaves_no_waiter_hanging() -> None:
    release = threading.Event()

    def stuck(items: Sequence[int]) -> list[int]:
        release.wait(10)
        return list(items)

    batcher: ThreadBatcher[int, int] = ThreadBatcher(stuck, max_batch=1)
    waiters = [asyncio.create_task(batcher.submit(i)) for i in range(3)]
    await asyncio.sleep(0.05)
    assert batcher._worker is not None
    batcher._worker.cancel()  # the process shutting down
    done = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(d, asyncio.CancelledError) for d in done)
    release.set()
