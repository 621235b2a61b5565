"""`topics.tasks.unless`: the work's result unless the trigger comes first; only its own
cancellation becomes Interrupted, and a trigger that comes too late touches nothing."""

from __future__ import annotations

import asyncio

import pytest

from topics.tasks import Interrupted, unless


async def test_the_work_finishing_first_gives_its_result() -> None:
    trigger: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await unless(asyncio.sleep(0, result="answer"), trigger) == "answer"


async def test_the_trigger_first_cancels_the_work_and_interrupts() -> None:
    loop = asyncio.get_running_loop()
    trigger: asyncio.Future[None] = loop.create_future()
    work: asyncio.Future[str] = loop.create_future()
    loop.call_later(0.01, trigger.set_result, None)
    with pytest.raises(Interrupted):
        await unless(work, trigger)
    assert work.cancelled()


async def test_a_trigger_that_fails_does_not_interrupt() -> None:
    loop = asyncio.get_running_loop()
    trigger: asyncio.Future[None] = loop.create_future()
    loop.call_later(0.01, trigger.set_exception, RuntimeError("listener broke"))
    assert await unless(asyncio.sleep(0.05, result="answer"), trigger) == "answer"


async def test_a_cancellation_from_elsewhere_propagates() -> None:
    trigger: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiting = asyncio.ensure_future(unless(asyncio.sleep(30), trigger))
    await asyncio.sleep(0.01)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting


async def test_a_trigger_in_the_same_turn_as_the_answer_cancels_nothing_later() -> None:
    loop = asyncio.get_running_loop()
    trigger: asyncio.Future[None] = loop.create_future()
    work: asyncio.Future[str] = loop.create_future()

    def both() -> None:  # the answer and the trigger in one loop turn, the answer first
        work.set_result("answer")
        trigger.set_result(None)

    loop.call_soon(both)
    assert await unless(work, trigger) == "answer"
    # The trigger's callback may run after the work returned: it must not cancel this.
    assert await asyncio.sleep(0.01, result="still running") == "still running"
