"""A process's runtime opens what the process needs, and closes all of it however it leaves."""

from __future__ import annotations

import pytest

from compose.stack import LocalStack
from state.runtime import Needs, open_runtime


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
