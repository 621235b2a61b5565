"""Awaiting one thing unless another happens first, without a task for either.

Racing two tasks (`asyncio.wait(..., FIRST_COMPLETED)`) costs a task per wait and two more
loop turns before the winner's caller runs again; on the hot path (each request's first
answer in the ingress, each poll of the consume loop) those turns are latency. Here the work
is awaited in the caller's own task, and the trigger cancels that task; the cancellation is
told apart from anybody else's with `Task.uncancel`."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Interrupted(Exception):
    """`trigger` completed before the work did; the work was cancelled."""


async def unless(work: Awaitable[T], trigger: asyncio.Future[Any]) -> T:
    """`work`'s result, unless `trigger` completes first without an error: then `work` is
    cancelled and Interrupted raised. A cancellation from elsewhere propagates as usual."""
    task = asyncio.current_task()
    assert task is not None, "unless() runs inside a task"
    armed, fired = True, False

    def on_trigger(done: asyncio.Future[Any]) -> None:
        nonlocal fired
        # Armed: a trigger whose callback runs after the work has finished must not cancel
        # whatever the caller awaits next.
        if armed and not done.cancelled() and done.exception() is None:
            fired = True
            task.cancel()

    trigger.add_done_callback(on_trigger)
    try:
        return await work
    except asyncio.CancelledError:
        if fired and task.uncancel() == 0:  # our cancellation, nobody else's
            raise Interrupted from None
        raise
    finally:
        armed = False
        trigger.remove_done_callback(on_trigger)
