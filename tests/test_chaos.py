"""The fault suite's quick form (`python -m bench.chaos --quick`) on a stack of its own:
Redis SIGKILLed and restarted, then a router and the usage worker SIGKILLed and restarted by
the supervisor, under open-loop load; no request hangs or is silently truncated, every 503 has
Retry-After, and every answered request is billed exactly once. And, as a unit test, what
the full suite found in the ingress."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry

from bench.chaos import failures, parse, run
from ingress.metrics import IngressMetrics
from ingress.pipeline import Pipeline, Submission
from ingress.replies import ReplyRouter
from topics.errors import Unavailable
from topics.identity import Principal
from topics.settings import IngressSettings


async def test_quick_fault_suite_no_hang_no_truncation_exact_ledger() -> None:
    scenarios = await run(parse(["--quick"]), lambda line: None)
    assert [s.name for s in scenarios] == ["kill-redis", "kill-router", "kill-usage"]
    for scenario in scenarios:
        assert scenario.samples, scenario.name
        assert not failures(scenario), (scenario.name, failures(scenario),
                                        scenario.outcomes())


async def test_a_produce_the_broker_never_acknowledges_is_503_within_the_deadline() -> None:
    # What kill-kafka found: a send aiokafka had handed to the dead broker waited for its
    # return, past the request's deadline. It is bounded: 503 queue_unavailable, Retry-After.
    class Stuck:
        async def send_and_wait(self, *args: Any, **kwargs: Any) -> None:
            await asyncio.sleep(3600)

    class Replies:
        channel = "replies:test"

    pipeline = Pipeline(settings=IngressSettings(), producer=cast(AIOKafkaProducer, Stuck()),
                        redis_client=cast(redis.Redis, None),
                        replies=cast(ReplyRouter, Replies()),
                        metrics=IngressMetrics(CollectorRegistry()), max_message_bytes=1 << 20)
    job = Submission(request_id="req_stuck", owner=Principal(key_id="k", tenant_id="t"),
                     endpoint="chat.completions", body={"model": "m", "messages": []},
                     routing={}, metadata=None, timeout_s=0.2, traceparent=None)
    started = time.monotonic()
    with pytest.raises(Unavailable) as failed:
        await pipeline._publish(job)
    assert time.monotonic() - started < 2
    assert failed.value.code == "queue_unavailable"
    assert failed.value.retry_after_s is not None
