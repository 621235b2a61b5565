"""What happens when things go wrong: a router killed mid-load, a client that leaves
mid-stream, a request that outlives its deadline in the queue, a redelivered request."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from tests.conftest import FakeAdmin, eventually
from tests.kafka_util import caught_up, read_topic
from topics import names
from topics.kafka import make_producer
from topics.settings import KafkaSettings


async def test_killed_router_loses_no_request_and_runs_none_twice(
        gateway: Gateway, client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    victim_in_flight = 4
    gateway.spawn("router-victim", "router",
                  env={"SWITCHYARD_ROUTER__MAX_IN_FLIGHT": str(victim_in_flight)})
    await eventually(lambda: "assigned [" in gateway.log_file("router-victim").read_text(),
                     timeout_s=30)
    await asyncio.sleep(1)  # let the survivor finish its side of the rebalance
    await fake.configure(ttft_ms=1500)
    total = 40

    calls = [asyncio.create_task(client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": f"k{i} go"}]))
        for i in range(total)]
    # Both routers are mid-call, and the victim has more queued behind its limit.
    await eventually(lambda: _requests_seen(fake, 2 * victim_in_flight), timeout_s=10)
    gateway.kill("router-victim")
    results = await asyncio.gather(*calls, return_exceptions=True)

    served = [r for r in results if not isinstance(r, BaseException)]
    interrupted = [r for r in results if isinstance(r, openai.APIStatusError)
                   and r.status_code == 502 and r.code == "worker_lost"]
    assert len(served) + len(interrupted) == total, [r for r in results
                                                      if isinstance(r, BaseException)]
    # Only what the victim had started can be lost with it, and it is reported, not re-run.
    assert len(interrupted) <= victim_in_flight
    # An interrupted request was claimed by the victim, which may have died before its call
    # reached the provider; every other request was called, and none twice.
    per_request = (await fake.stats())["calls_by_request_id"]
    assert total - len(interrupted) <= len(per_request) <= total
    assert set(per_request.values()) == {1}


async def _requests_seen(fake: FakeAdmin, at_least: int) -> bool:
    return int((await fake.stats())["requests_total"]) >= at_least


async def test_client_disconnect_mid_stream_closes_the_upstream_call(
        gateway: Gateway, http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    await fake.configure(tokens=500, inter_token_ms=20)

    async with http.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "long story"}]}) as response:
        assert response.status_code == 200
        received = 0
        async for line in response.aiter_lines():
            received += line.startswith("data:")
            if received == 5:
                break  # leave mid-answer

    stats = await eventually(lambda: _disconnected(fake), timeout_s=5)
    assert stats["completed_streams"] == 0


async def _disconnected(fake: FakeAdmin) -> dict[str, int] | None:
    stats = await fake.stats()
    return stats if stats["disconnects"] >= 1 and stats["open_streams"] == 0 else None


async def test_request_queued_past_its_deadline_times_out_and_never_runs(
        gateway: Gateway, http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    router = gateway.processes["router-0"]
    router.send_signal(signal.SIGSTOP)  # the request will wait in Kafka
    try:
        response = await http.post(
            "/v1/chat/completions", headers={"x-switchyard-timeout-ms": "300"},
            json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "late"}]})
    finally:
        router.send_signal(signal.SIGCONT)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "deadline_exceeded"
    settings = gateway.settings.kafka
    await eventually(lambda: _caught_up(settings), timeout_s=20)
    assert response.headers["x-request-id"] not in (await fake.stats())["calls_by_request_id"]


async def _caught_up(settings: KafkaSettings) -> bool:
    return (await caught_up(settings, names.REQUESTS_GROUP, names.REQUESTS)
            and await caught_up(settings, names.CLASSIFIED_GROUP, names.CLASSIFIED))


async def test_batch_request_published_twice_is_answered_once_on_the_reply_topic(
        gateway: Gateway, fake: FakeAdmin, api_key_ids: tuple[str, str]) -> None:
    request_id = f"batch-{uuid.uuid4().hex}"
    messages = [{"role": "user", "content": "batchy job"}]
    envelope = orjson.dumps({
        "schema_version": 1, "request_id": request_id, "tenant_id": api_key_ids[0],
        "key_id": api_key_ids[1], "received_at_ms": _now_ms(),
        "deadline_ms": _now_ms() + 60_000,
        "body": {"model": "gpt-4o-mini", "messages": messages},
        "reply": {"topic": names.REPLIES}})
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        for _ in range(2):  # a redelivery, as a producer retry or a consumer crash causes
            await producer.send_and_wait(names.REQUESTS, envelope, key=request_id.encode())
    finally:
        await producer.stop()

    def answered(records: list[object]) -> bool:
        return any(f["kind"] == "done" for f in _frames(records, request_id))

    await read_topic(gateway.settings.kafka, names.REPLIES, answered)
    await eventually(lambda: _caught_up(gateway.settings.kafka), timeout_s=20)
    # Both copies have been consumed now; the reply topic still holds one answer.
    frames = _frames(await read_topic(gateway.settings.kafka, names.REPLIES, answered),
                     request_id)
    assert [f["kind"] for f in frames] == ["meta", "done"]
    assert [f["seq"] for f in frames] == [0, 1]
    completion = frames[1]["data"]["completion"]
    assert completion["choices"][0]["message"]["content"] == expected_content(messages, 16)
    assert (await fake.stats())["calls_by_request_id"][request_id] == 1


def _frames(records: list[object], request_id: str) -> list[dict[str, Any]]:
    frames = [orjson.loads(r.value) for r in records]  # type: ignore[attr-defined]
    return [f for f in frames if f["request_id"] == request_id]


def _now_ms() -> int:
    return int(time.time() * 1000)


async def test_a_stream_cut_mid_answer_ends_in_an_error_event_not_done(
        http: httpx.AsyncClient, client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    await fake.configure(tokens=50, cut_after_tokens=10, inter_token_ms=2)
    body = {"model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "cut me"}]}

    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = [line async for line in response.aiter_lines() if line.startswith("data:")]

    assert "data: [DONE]" not in events
    error = orjson.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_stream_cut"
    assert sum('"content":"cut-' in e for e in events) == 10  # what was sent stays sent

    messages: Any = body["messages"]
    stream = await client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                                  messages=messages)
    received: list[Any] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(openai.APIError) as failure:
        await consume()
    assert failure.value.code == "upstream_stream_cut"
    assert len(received) >= 10
