"""Usage: one ledger row per attempt with the tokens the provider reported, a daily rollup
that always agrees with the ledger, and no double counting when Kafka redelivers."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer

from compose.gateway import Gateway
from tests.conftest import FakeAdmin, eventually
from tests.kafka_util import read_topic
from topics import names
from topics.kafka import make_producer
from topics.messages import UsageEvent

AGREEMENT = """
SELECT count(*) FROM (
    SELECT tenant_id, (started_at AT TIME ZONE 'UTC')::date AS day, model, provider,
           count(*) FILTER (WHERE attempt = 1) AS requests, count(*) AS attempts,
           sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens,
           sum(cached_tokens) AS cached_tokens, sum(cost_usd) AS cost_usd
    FROM usage_events GROUP BY 1, 2, 3, 4
) ledger FULL JOIN usage_daily rollup USING (tenant_id, day, model, provider)
WHERE ledger IS DISTINCT FROM NULL AND rollup IS DISTINCT FROM NULL
  AND (ledger.requests, ledger.attempts, ledger.prompt_tokens, ledger.completion_tokens,
       ledger.cached_tokens, ledger.cost_usd)
      IS DISTINCT FROM (rollup.requests, rollup.attempts, rollup.prompt_tokens,
                        rollup.completion_tokens, rollup.cached_tokens, rollup.cost_usd)
   OR ledger IS NULL OR rollup IS NULL
"""


async def rows_for(pg: asyncpg.Pool, request_ids: list[str]) -> list[asyncpg.Record] | None:
    rows = await pg.fetch("SELECT * FROM usage_events WHERE request_id = ANY($1)", request_ids)
    return rows if len(rows) >= len(request_ids) else None


async def test_one_row_per_attempt_with_the_reported_tokens(
        client: openai.AsyncOpenAI, http: httpx.AsyncClient, fake: FakeAdmin,
        pg: asyncpg.Pool) -> None:
    await fake.configure(tokens=7, prompt_tokens_override=31, cached_tokens=11)
    messages: Any = [{"role": "user", "content": "count me"}]
    plain = await client.chat.completions.create(model="gpt-4o", messages=messages)
    stream = await client.chat.completions.create(model="gpt-4o", messages=messages,
                                                  stream=True)
    streamed_id = stream.response.headers["x-request-id"]
    _ = [chunk async for chunk in stream]
    request_ids = [str(plain._request_id), streamed_id]

    rows = await eventually(lambda: rows_for(pg, request_ids))

    assert len(rows) == 2
    for row in rows:
        assert (row["status"], row["provider"], row["model"]) == ("ok", "openai", "gpt-4o")
        assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (
            31, 7, 11)
        assert row["estimated"] is False
        assert row["attempt"] == 1
        # gpt-4o: 20 uncached in at $2.50/M + 11 cached at $1.25/M + 7 out at $10/M
        # = (50 + 13.75 + 70) / 1e6
        assert row["cost_usd"] == Decimal("0.00013375")
        assert row["ttft_ms"] is not None
        assert row["latency_ms"] >= row["ttft_ms"]
    assert await pg.fetchval(AGREEMENT) == 0


async def test_failed_attempts_are_recorded_too(client: openai.AsyncOpenAI, fake: FakeAdmin,
                                                pg: asyncpg.Pool) -> None:
    await fake.configure(error_rate=1.0, error_status=500)
    with pytest.raises(openai.APIStatusError) as failure:
        await client.chat.completions.create(model="gpt-4o-mini",
                                             messages=[{"role": "user", "content": "fail"}])
    assert failure.value.status_code == 502
    assert failure.value.code == "upstream_server_error"
    request_id = str(failure.value.request_id)

    rows = await eventually(lambda: rows_for(pg, [request_id]))
    assert rows[0]["status"] == "error"
    assert rows[0]["error_code"] == "upstream_server_error"


async def test_a_replayed_usage_event_changes_neither_ledger_nor_rollup(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    event = UsageEvent(
        event_id=str(uuid.uuid4()), request_id=f"replay-{uuid.uuid4().hex}", tenant_id="replay",
        key_id="k", provider="p", model="m", status="ok", prompt_tokens=100,
        completion_tokens=50, cost_usd=Decimal("0.0125"), latency_ms=12.5,
        started_at_ms=1_700_000_000_000, finished_at_ms=1_700_000_000_100)
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        for _ in range(3):  # the same event, redelivered
            await producer.send_and_wait(names.USAGE, event.to_json(),
                                         key=event.request_id.encode())
        marker = event.model_copy(update={"event_id": str(uuid.uuid4()),
                                          "request_id": event.request_id + "-marker"})
        await producer.send_and_wait(names.USAGE, marker.to_json(),
                                     key=event.request_id.encode())
    finally:
        await producer.stop()

    # The marker travels the same partition after the copies: once it is in, they all are.
    await eventually(lambda: rows_for(pg, [marker.request_id]))
    assert await pg.fetchval("SELECT count(*) FROM usage_events WHERE request_id = $1",
                             event.request_id) == 1
    rollup = await pg.fetchrow("SELECT * FROM usage_daily WHERE tenant_id = 'replay'")
    assert rollup is not None
    assert (rollup["requests"], rollup["prompt_tokens"], rollup["cost_usd"]) == (
        2, 200, Decimal("0.0250"))
    assert await pg.fetchval(AGREEMENT) == 0


async def test_undecodable_usage_event_goes_to_the_dlq(gateway: Gateway,
                                                       pg: asyncpg.Pool) -> None:
    garbage = b'{"schema_version": 1, "event_id": "not-even-close"}'
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(names.USAGE, garbage)
    finally:
        await producer.stop()

    records = await read_topic(gateway.settings.kafka, names.dlq(names.USAGE),
                               lambda rs: any(r.value == garbage for r in rs))
    dead = next(r for r in records if r.value == garbage)
    assert dict(dead.headers)[names.H_DLQ_REASON].startswith(b"undecodable")


async def test_a_stream_without_usage_is_billed_from_an_estimate_marked_as_such(
        client: openai.AsyncOpenAI, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(tokens=12, omit_stream_usage=True)
    prompt = "estimate this prompt of forty characters."
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": prompt}], stream=True,
        stream_options={"include_usage": True})
    request_id = stream.response.headers["x-request-id"]
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None  # the client still gets usage: our estimate

    rows = await eventually(lambda: rows_for(pg, [request_id]))
    row = rows[0]
    assert row["estimated"] is True
    assert row["completion_tokens"] == 12  # one token per streamed content chunk
    assert row["prompt_tokens"] > 0
    assert row["cost_usd"] == (row["prompt_tokens"] * Decimal("0.15")
                               + 12 * Decimal("0.60")) / 10**6
