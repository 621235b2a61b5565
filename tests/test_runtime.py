"""A process's runtime opens what the process needs, and closes all of it however it leaves."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
import redis.asyncio as redis

from compose.stack import LocalStack
from state.runtime import Needs, open_runtime, outage


async def test_a_runtime_opens_what_is_needed_and_closes_it_all(stack: LocalStack) -> None:
    async with open_runtime(stack.settings) as runtime:
        assert await runtime.redis.ping()
        assert await runtime.pool.fetchval("SELECT 1") == 1
        consumer = await runtime.consumer("test-runtime")
        producer, pool = runtime.producer, runtime.pool
        assert not pool.is_closing()
    assert pool.is_closing()
    assert producer._closed  # aiokafka's own flag: stop() has run
    assert consumer._closed


async def test_what_a_process_did_not_ask_for_is_a_clear_error(stack: LocalStack) -> None:
    async with open_runtime(stack.settings, Needs(redis=False, postgres=False)) as runtime:
        with pytest.raises(RuntimeError, match="did not open redis"):
            _ = runtime.redis
        with pytest.raises(RuntimeError, match="did not open postgres"):
            _ = runtime.pool


async def test_resources_are_closed_when_the_process_fails(stack: LocalStack) -> None:
    opened = []

    async def failing_process() -> None:
        async with open_runtime(stack.settings, Needs(kafka=False)) as runtime:
            opened.append(runtime.pool)
            raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await failing_process()
    assert opened[0].is_closing()


@pytest.mark.parametrize(("failure", "code"), [
    (ConnectionRefusedError(111, "Connection refused"), "database_unavailable"),
    (asyncpg.CannotConnectNowError("the database system is starting up"),
     "database_unavailable"),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
     "database_unavailable"),
    (TimeoutError(), "database_unavailable"),
    (redis.ConnectionError("Connection refused"), "state_unavailable"),
    (redis.TimeoutError("Timeout reading from socket"), "state_unavailable"),
    (ValueError("a bug"), None),
    (asyncpg.UniqueViolationError("duplicate key"), None),
    (redis.ResponseError("WRONGTYPE"), None),
])
def test_an_outage_of_the_stack_is_a_503_and_anything_else_is_not(
        failure: Exception, code: str | None) -> None:
    down = outage(failure)
    assert (down.code if down else None) == code
    if down is not None:
        assert (down.status, down.retry_after_s) == (503, 2.0)


async def test_closes_that_hang_share_one_bounded_budget(stack: LocalStack) -> None:
    """A close that never returns (its service paused) is cancelled at the budget's end and
    aborted; the closes after it still run, each with a last short turn."""
    settings = stack.settings.model_copy(update={"shutdown_close_timeout_s": 0.3})
    done: list[str] = []

    async def hang() -> None:
        await asyncio.Event().wait()

    async def quick(name: str) -> None:
        done.append(name)

    loop = asyncio.get_running_loop()
    async with open_runtime(settings, Needs(kafka=False, redis=False,
                                            postgres=False)) as runtime:
        runtime.on_close(quick, "first registered, closed last")
        runtime.on_close(hang, name="second hang", quiet=True)
        runtime.on_close(hang, name="first hang", abort=lambda: done.append("aborted"))
        started = loop.time()
    # Generous: the point is that it returns at all, after about the budget.
    assert loop.time() - started < 5
    assert done == ["aborted", "first registered, closed last"]
