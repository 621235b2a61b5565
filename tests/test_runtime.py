"""A process's runtime opens what the process needs, and closes all of it however it leaves."""

from __future__ import annotations

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
