"""Exactly-once billing when a router dies after answering, and the cancel listener across a
Redis outage, on a stack of their own (these tests kill routers and Redis, which the session
stack's users must never see).

The gap closed (issue 16): a router publishes a request's answer, then writes its usage
events to `llm.usage`. SIGKILLed in between, it used to leave an answered request unbilled:
its successor got the request again, found the claim orphaned and reported `worker_lost` to a
client that had its answer. Now the answer's last frame and the bill are one Redis write
(`workers/router/frames.py`, `state/claims.py`), and the successor writes that bill.

The window is made wide and certain with configuration, not a test hook: the victim router's
Kafka producer lingers 60 s before sending anything (`SWITCHYARD_KAFKA__LINGER_MS`), while its
answers go out over Redis at once. So it has answered, and its usage events sit in its memory,
when it is killed."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as redis
from aiokafka import AIOKafkaProducer

from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from state.claims import publish_cancel
from state.keys import create_key
from state.redis_client import make_redis
from tests.conftest import eventually
from tests.kafka_util import caught_up, read_topic
from topics import names
from topics.kafka import make_producer
from topics.messages import UsageEvent
from topics.settings import RouterSettings, Settings
from workers.router.attempt import produce_usage
from workers.router.cancel import CancelListener


@pytest.fixture(scope="module")
def own_stack() -> Iterator[LocalStack]:
    base = Settings(router=RouterSettings(shutdown_grace_s=2, heartbeat_ttl_ms=1000))
    with LocalStack.ephemeral(base) as local:
        yield local


@pytest.fixture
def gateway(own_stack: LocalStack, tmp_path: Path) -> Iterator[Gateway]:
    """Ingress, usage worker and the fake upstream; no router: each test starts its own."""
    fake_port = free_port()
    settings = own_stack.settings.model_copy(update={
        "ingress": own_stack.settings.ingress.model_copy(update={"port": free_port()}),
        "fallback_upstream_url": f"http://127.0.0.1:{fake_port}/v1"})
    with Gateway(settings, tmp_path, routers=0, fake_upstream_port=fake_port) as running:
        yield running


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    conn = await asyncpg.connect(gateway.settings.postgres.owner_dsn)
    try:
        _, key = await create_key(conn, "billing-failover")
    finally:
        await conn.close()
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60, headers={
            "Authorization": f"Bearer {key}", "x-switchyard-timeout-ms": "60000"}) as client:
        yield client


async def _start_router(gateway: Gateway, name: str, env: dict[str, str]) -> None:
    gateway.spawn(name, "router", env=env)
    await eventually(lambda: "assigned [" in gateway.log_file(name).read_text(), timeout_s=60)


async def _whole(http: httpx.AsyncClient) -> str:
    response = await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "bill me whole"}]})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"]
    return response.headers["x-request-id"]


async def _streamed(http: httpx.AsyncClient) -> str:
    async with http.stream("POST", "/v1/chat/completions", json={
            "model": "gpt-4o-mini", "stream": True,
            "messages": [{"role": "user", "content": "bill me streamed"}]}) as response:
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]"  # the whole answer reached the client
    return response.headers["x-request-id"]


async def _ledger(gateway: Gateway, request_ids: list[str]) -> list[tuple[str, str, int]]:
    conn = await asyncpg.connect(gateway.settings.postgres.owner_dsn)
    try:
        rows = await conn.fetch("SELECT event_id::text, request_id, attempt FROM usage_events "
                                "WHERE request_id = ANY($1::text[]) ORDER BY event_id",
                                request_ids)
    finally:
        await conn.close()
    return [(r["event_id"], r["request_id"], r["attempt"]) for r in rows]


async def _bill(client: redis.Redis, request_id: str) -> list[UsageEvent]:
    """The bill the claim carries: `ans:<worker>\\n<events>`."""
    claim = await client.get(f"sy:claim:{request_id}")
    assert isinstance(claim, bytes)
    assert claim.startswith(b"ans:"), claim
    return [UsageEvent.model_validate(e) for e in orjson.loads(claim.split(b"\n", 1)[1])]


async def test_a_router_killed_after_answering_leaves_its_bill_to_its_successor(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    await _start_router(gateway, "router-victim", {"SWITCHYARD_KAFKA__LINGER_MS": "60000"})
    whole, streamed = await _whole(http), await _streamed(http)
    ids = [whole, streamed]
    client = make_redis(gateway.settings.redis)
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        # Answered; the usage events are still in the victim's producer, the bill in Redis.
        bills = {request_id: await _bill(client, request_id) for request_id in ids}
        assert all(len(bill) == 1 and bill[0].status == "ok" for bill in bills.values())
        assert await _ledger(gateway, ids) == []
        # One of them had got out before the kill: written twice, it is still one row.
        await produce_usage(producer, bills[streamed])

        gateway.kill("router-victim")  # SIGKILL
        metrics_port = free_port()
        await _start_router(gateway, "router-successor",
                            {"SWITCHYARD_ROUTER__METRICS_PORT": str(metrics_port)})
        expected = sorted((e.event_id, e.request_id, e.attempt)
                          for bill in bills.values() for e in bill)

        async def billed() -> bool:
            return await _ledger(gateway, ids) == expected

        await eventually(billed, timeout_s=60, every_s=0.5)
        log = gateway.log_file("router-successor").read_text()
        assert log.count("which died before writing its usage") == 2
        assert "worker_lost" not in log
        assert "was interrupted" not in log
        async with httpx.AsyncClient() as scrape:
            metrics = (await scrape.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
        assert 'switchyard_router_orphans_total{outcome="billed"} 2.0' in metrics
        for request_id in ids:
            assert await client.get(f"sy:claim:{request_id}") == b"done"

        # Replays: the requests delivered once more, the usage events written once more.
        records = await read_topic(gateway.settings.kafka, names.REQUESTS,
                                   lambda rs: len(_of(rs, ids)) == len(ids))
        for record in _of(records, ids):
            await producer.send_and_wait(names.REQUESTS, record.value, key=record.key,
                                         headers=list(record.headers))
        for bill in bills.values():
            await produce_usage(producer, bill)

        async def settled() -> bool:
            return (await caught_up(gateway.settings.kafka, names.REQUESTS_GROUP,
                                    names.REQUESTS)
                    and await caught_up(gateway.settings.kafka, names.USAGE_GROUP,
                                        names.USAGE))

        await eventually(settled, timeout_s=60, every_s=0.5)
        assert await _ledger(gateway, ids) == expected
    finally:
        await producer.stop()
        await client.aclose()


def _of(records: list[Any], request_ids: list[str]) -> list[Any]:
    return [r for r in records if r.key is not None and r.key.decode() in request_ids]


async def test_a_router_killed_mid_call_is_still_reported_worker_lost(
        gateway: Gateway, http: httpx.AsyncClient) -> None:
    """Nothing answered, no bill: the client hears the call was interrupted."""
    await _start_router(gateway, "router-victim", {})
    fake = str(gateway.settings.fallback_upstream_url).removesuffix("/v1")
    async with httpx.AsyncClient(base_url=fake) as admin:
        await admin.put("/_fake/config", json={"ttft_ms": 30_000})
        asking = asyncio.create_task(http.post("/v1/chat/completions", json={
            "model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hold on"}]}))

        async def called() -> bool:
            return bool((await admin.get("/_fake/stats")).json()["requests_total"])

        await eventually(called, timeout_s=30)
        gateway.kill("router-victim")  # SIGKILL
        await _start_router(gateway, "router-successor", {})
        response = await asyncio.wait_for(asking, timeout=60)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "worker_lost"
    assert await _ledger(gateway, [response.headers["x-request-id"]]) == []


# ------------------------------------------------------------------ the cancel listener


async def _listening(stack: LocalStack) -> tuple[redis.Redis, CancelListener,
                                                   asyncio.Task[None]]:
    client = make_redis(stack.settings.redis)
    listener = CancelListener(client, check_s=0.2, answer_s=0.5)
    ready = asyncio.Event()
    task = asyncio.create_task(listener.run(ready))
    await asyncio.wait_for(ready.wait(), timeout=10)
    return client, listener, task


async def _cancels(listener: CancelListener, stack: LocalStack) -> bool:
    """Whether a cancel published now (as the ingress does) stops the request it names."""
    request_id = f"req_{uuid.uuid4().hex}"
    work = asyncio.create_task(asyncio.sleep(3600))
    listener.register(request_id, work)
    client = make_redis(stack.settings.redis)  # the ingress's: not this test's, restarted
    try:
        await publish_cancel(client, request_id, "client_disconnected", ttl_s=60)
        await asyncio.wait({work}, timeout=5)
        return work.cancelled()
    finally:
        listener.unregister(request_id)
        work.cancel()
        await client.aclose()


async def test_the_cancel_listener_subscribes_again_after_redis_restarts(
        own_stack: LocalStack) -> None:
    client, listener, task = await _listening(own_stack)
    try:
        assert await _cancels(listener, own_stack)
        own_stack.kill("redis")
        await eventually(lambda: not listener.connected, timeout_s=10)
        await asyncio.to_thread(own_stack.start_again, "redis")
        await eventually(lambda: listener.connected, timeout_s=10)
        assert await _cancels(listener, own_stack)
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_a_cancel_missed_while_the_channel_was_down_still_stops_its_request(
        own_stack: LocalStack) -> None:
    client, listener, task = await _listening(own_stack)
    try:
        request_id = f"req_{uuid.uuid4().hex}"
        work = asyncio.create_task(asyncio.sleep(3600))
        listener.register(request_id, work)
        # The client left while the channel was down: its cancel mark is set, the message
        # never reached the listener.
        await client.set(f"sy:cancelled:{request_id}", b"1", ex=60)
        await client.client_kill_filter(_type="pubsub")  # the listener's connection drops
        await asyncio.wait({work}, timeout=10)
        assert work.cancelled()
        assert listener.connected
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def test_the_cancel_listener_notices_a_paused_redis(own_stack: LocalStack) -> None:
    client, listener, task = await _listening(own_stack)
    redis_pid = own_stack.pids()["redis"]
    try:
        assert listener.connected
        os.kill(redis_pid, signal.SIGSTOP)
        try:
            # No error comes from a paused Redis: its silence to a PING is what tells.
            await eventually(lambda: not listener.connected, timeout_s=10)
        finally:
            os.kill(redis_pid, signal.SIGCONT)
        await eventually(lambda: listener.connected, timeout_s=10)
        assert await _cancels(listener, own_stack)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()
