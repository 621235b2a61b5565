"""Resilience modes on the real stack, with fake providers: failover that the client never
sees, streams that fail loudly, circuit breakers shared between workers, speculative racing,
hedging, council, mode selection and its bad input."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from compose.gateway import Gateway
from state.bandit import PosteriorStore, arm_keys
from state.breakers import BreakerConfig, Breakers
from state.keys import create_key
from state.redis_client import make_redis
from tests.conftest import FakeAdmin, eventually

# Three fast openai-dialect routes of three providers, and a judge outside them.
A, B, C = "deepseek-chat", "mistral-small-latest", "qwen-plus"
JUDGE = "gpt-4o-mini"
QA = {"x-switchyard-category": "question_answering"}


class Tenant:
    def __init__(self, http: httpx.AsyncClient, sdk: openai.AsyncOpenAI) -> None:
        self.http = http
        self.sdk = sdk

    async def chat(self, *, mode: str | None = None, stream: bool = False,
                   extension: dict[str, Any] | None = None, model: str = "auto",
                   content: str = "what is two plus two") -> httpx.Response:
        body: dict[str, Any] = {"model": model, "stream": stream,
                                "messages": [{"role": "user", "content": content}]}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if extension is not None:
            body["switchyard"] = extension
        headers = {**QA, **({"x-switchyard-mode": mode} if mode else {})}
        return await self.http.post("/v1/chat/completions", json=body, headers=headers)


@pytest.fixture
async def tenant(gateway: Gateway, pg: asyncpg.Pool) -> AsyncIterator[Tenant]:
    """A tenant whose policy admits three routes."""
    _, key = await create_key(pg, f"modes-{uuid.uuid4().hex[:8]}")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        stored = await http.put("/v1/routing/policy", json={"allowed_models": [A, B, C]})
        assert stored.status_code == 200, stored.text
        sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                                 timeout=30, default_headers=QA)
        yield Tenant(http, sdk)
        await sdk.close()


@pytest.fixture(autouse=True)
async def fresh_arms(gateway: Gateway) -> None:
    """Every test starts with the three routes unlearnt: what one test's failures taught the
    bandit must not keep a route from being chosen in the next."""
    client = make_redis(gateway.settings.redis)
    try:
        await client.delete(*(k for r in (A, B, C) for k in arm_keys("question_answering", r)))
    finally:
        await client.aclose()
    await asyncio.sleep(gateway.settings.router.posterior_cache_ttl_s)


async def prefer(gateway: Gateway, route: str) -> None:
    """Teach the bandit that `route` is by far the best of the three, so that the router
    chooses it first: what a test about its failing (or being slow) needs."""
    client = make_redis(gateway.settings.redis)
    store = PosteriorStore(client, half_life_s=gateway.settings.router.bandit_half_life_s)
    try:
        for other in (A, B, C):
            for _ in range(8):
                await store.update(uuid.uuid4().hex, "question_answering", other,
                                   1.0 if other == route else 0.0, success=other == route,
                                   latency_ms=10.0)
    finally:
        await client.aclose()
    await asyncio.sleep(gateway.settings.router.posterior_cache_ttl_s)


@pytest.fixture
async def breakers(gateway: Gateway) -> AsyncIterator[Breakers]:
    """This test process as one more router: the same breakers, the same Redis."""
    client = make_redis(gateway.settings.redis)
    yield Breakers(client, BreakerConfig.from_settings(gateway.settings.router), cache_ttl_s=0)
    await client.aclose()


def sse_events(raw: str) -> list[str]:
    """The `data:` payloads and `:` comments of an SSE body, in order."""
    return [line for line in raw.split("\n") if line.startswith(("data:", ":"))]


def last_metadata(events: list[str]) -> dict[str, Any]:
    for line in reversed(events):
        if line.startswith("data: {") and '"metadata"' in line:
            return dict(orjson.loads(line[6:])["metadata"])
    raise AssertionError(f"no metadata in {events}")


def content_of(events: list[str]) -> str:
    out = []
    for line in events:
        if line.startswith("data: {"):
            for choice in orjson.loads(line[6:]).get("choices") or ():
                out.append(choice.get("delta", {}).get("content") or "")
    return "".join(out)


async def ledger(pg: asyncpg.Pool, request_id: str, rows: int) -> list[asyncpg.Record]:
    async def found() -> list[asyncpg.Record] | None:
        records = await pg.fetch("SELECT * FROM usage_events WHERE request_id = $1 "
                                 "ORDER BY attempt", request_id)
        return records if len(records) >= rows else None
    return list(await eventually(found))


# --- failover -----------------------------------------------------------------------------

async def test_a_route_failing_before_its_first_token_is_invisible_to_the_client(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(per_model={A: {"error_rate": 1.0, "error_status": 503}})
    await prefer(gateway, A)
    failed_over: list[tuple[str, list[dict[str, Any]]]] = []
    for i in range(12):
        raw = await tenant.sdk.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": f"failover {i}"}])
        assert (raw.parse().choices[0].message.content or "").startswith("failover-0 ")
        metadata = orjson.loads(raw.content)["metadata"]
        assert metadata["model"] in (B, C)
        if len(metadata["attempts"]) > 1:
            failed_over.append((raw.headers["x-request-id"], metadata["attempts"]))
        stream = await tenant.sdk.chat.completions.create(
            model="auto", stream=True, messages=[{"role": "user", "content": f"stream {i}"}])
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text.startswith("stream-0 ")
    # The router did choose the failing route first, until its breaker opened ...
    assert failed_over
    calls = (await fake.stats())["calls_by_model"]
    assert calls[A] == gateway.settings.router.breaker_consecutive_failures
    request_id, attempts = failed_over[0]
    assert (attempts[0]["model"], attempts[0]["status"], attempts[0]["error"]) == \
        (A, "error", "upstream_overloaded")
    assert attempts[-1]["status"] == "ok"
    # ... and each attempt is its own usage event; the refused one cost nothing.
    rows = await ledger(pg, request_id, len(attempts))
    assert (rows[0]["model"], rows[0]["status"], rows[0]["cost_usd"]) == \
        (A, "error", Decimal(0))


async def test_without_fallback_a_failing_route_is_the_clients_error(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await fake.configure(per_model={A: {"error_rate": 1.0, "error_status": 503}})
    response = await tenant.http.post("/v1/chat/completions", headers=QA, json={
        "model": A, "messages": [{"role": "user", "content": "no fallback"}],
        "policy": {"fallback_enabled": False}})
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "upstream_overloaded"


async def test_a_stream_cut_after_tokens_ends_in_an_error_event_and_is_not_retried(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await fake.configure(cut_after_tokens=3)
    response = await tenant.chat(stream=True, content="cut me")
    assert response.status_code == 200
    events = sse_events(response.text)
    assert content_of(events).startswith("cut-0 cut-1 cut-2")
    assert "data: [DONE]" not in events
    error = orjson.loads(events[-1][6:])["error"]
    assert error["code"] == "upstream_stream_cut"
    request_id = response.headers["x-request-id"]
    assert (await fake.stats())["calls_by_request_id"][request_id] == 1


# --- circuit breakers ---------------------------------------------------------------------

async def test_a_breaker_opened_by_one_worker_is_honoured_by_another(
        tenant: Tenant, fake: FakeAdmin, breakers: Breakers) -> None:
    # This process opens A's breaker; the router process must stop calling A.
    for _ in range(breakers.config.consecutive_failures):
        await breakers.record(A, success=False)
    before = (await fake.stats())["calls_by_model"].get(A, 0)
    pinned = await tenant.chat(model=A, mode="fixed")
    assert pinned.status_code == 503, pinned.text
    assert pinned.json()["error"]["code"] == "circuit_open"
    # Our own 503: when to ask again is the breaker's cool-down.
    assert int(pinned.headers["retry-after"]) >= 1
    for _ in range(6):
        response = await tenant.chat()
        assert response.status_code == 200
        assert A not in [a["model"] for a in response.json()["metadata"]["attempts"]]
    assert (await fake.stats())["calls_by_model"].get(A, 0) == before


async def test_a_breaker_opened_by_the_router_is_seen_everywhere(
        tenant: Tenant, fake: FakeAdmin, breakers: Breakers) -> None:
    await fake.configure(per_model={B: {"error_rate": 1.0, "error_status": 500}})
    # Each request calls B again after its 500 (route_retries): fewer requests than
    # consecutive_failures open the breaker, each of them answered with B's error.
    for _ in range(breakers.config.consecutive_failures):
        response = await tenant.chat(model=B, mode="fixed")
        assert response.status_code == 502
        if (await breakers.views([B]))[0].state.value == "open":
            break
    views = {v.route: v for v in await breakers.views([B])}
    assert views[B].state.value == "open"
    assert views[B].retry_at_ms is not None
    stats = (await tenant.http.get("/v1/providers/stats")).json()
    listed = {b["route"]: b for b in stats["breakers"]}
    assert listed[B]["state"] == "open"
    assert listed[B]["consecutive_failures"] >= breakers.config.consecutive_failures


# --- speculative racing and hedging -------------------------------------------------------

async def test_a_race_streams_the_fastest_route_and_cancels_the_others(
        tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(per_model={A: {"ttft_ms": 4000}, B: {"ttft_ms": 4000},
                                    C: {"ttft_ms": 20}})
    response = await tenant.chat(mode="speculative", stream=True,
                                 extension={"routes": 3}, content="race me")
    assert response.status_code == 200
    events = sse_events(response.text)
    assert content_of(events).startswith("race-0 ")
    metadata = last_metadata(events)
    assert (metadata["model"], metadata["mode"]) == (C, "speculative")
    attempts = {a["model"]: a for a in metadata["attempts"]}
    assert attempts[C]["status"] == "ok"
    for loser in (A, B):
        assert (attempts[loser]["status"], attempts[loser]["error"]) == \
            ("cancelled", "race_lost")
        assert attempts[loser].get("estimated") is True  # the prompt was sent: estimated
    # The losers' connections were closed at once, long before their first token was due.
    stats = await eventually(lambda: _with_disconnects(fake, 2), timeout_s=2.0)
    assert stats["open_streams"] == 0
    assert Decimal(metadata["cost_usd_exact"]) == sum(Decimal(a["cost_usd_exact"]) for a in
                                                      metadata["attempts"])
    rows = await ledger(pg, response.headers["x-request-id"], 3)
    assert sorted((r["model"], r["status"]) for r in rows) == \
        sorted([(A, "cancelled"), (B, "cancelled"), (C, "ok")])
    assert sum(r["cost_usd"] for r in rows) == Decimal(metadata["cost_usd_exact"])


async def _with_disconnects(fake: FakeAdmin, count: int) -> dict[str, Any] | None:
    stats = await fake.stats()
    return stats if stats["disconnects"] >= count and stats["open_streams"] == 0 else None


async def test_hedging_starts_a_second_route_only_when_the_first_is_slow(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    # Teach the router each route's usual time to first token (20 observations each).
    await fake.configure(ttft_ms=10)
    for model in (A, B, C):
        for _ in range(20):
            assert (await tenant.chat(model=model, mode="fixed", stream=True)).status_code \
                == 200
    await fake.configure(ttft_ms=10, per_model={A: {"ttft_ms": 3000}})
    await prefer(gateway, A)
    hedged = []
    for _ in range(20):
        response = await tenant.chat(mode="hedged", stream=True)
        metadata = last_metadata(sse_events(response.text))
        assert metadata["mode"] == "hedged"
        assert metadata["model"] in (B, C)
        # Served by the hedge, not after waiting for the slow route.
        assert metadata["latency_ms"] < 2000
        if metadata["attempts"][0]["model"] == A:
            hedged.append(metadata["attempts"])
    # A lost race teaches nothing, so A stays first (until the winners' successes catch up).
    assert len(hedged) >= 15
    for attempts in hedged:
        assert (attempts[0]["model"], attempts[0]["status"]) == (A, "cancelled")
        assert attempts[1]["status"] == "ok"


async def test_the_tenant_policy_sets_the_default_mode(tenant: Tenant, fake: FakeAdmin) -> None:
    stored = await tenant.http.put("/v1/routing/policy", json={
        "allowed_models": [A, B, C], "default_mode": "speculative"})
    assert stored.status_code == 200, stored.text
    response = await tenant.chat()
    assert response.json()["metadata"]["mode"] == "speculative"
    assert len(response.json()["metadata"]["attempts"]) == 2  # the router's race_routes
    overridden = await tenant.chat(mode="auto")
    assert overridden.json()["metadata"]["mode"] == "auto"


# --- council ------------------------------------------------------------------------------

def _council_fake(slow: str | None = None) -> dict[str, Any]:
    per_model: dict[str, Any] = {
        A: {"answer": "The answer is 4"}, B: {"answer": "The answer is 5"},
        C: {"answer": "The answer is 22"},
        JUDGE: {"judge_key": "is 4", "answer": "Together: the answer is 4"}}
    if slow is not None:
        per_model[slow] = {**per_model[slow], "ttft_ms": 4000}
    return {"per_model": per_model}


async def test_the_council_returns_the_answer_the_judge_scores_best(
        tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(**_council_fake())
    response = await tenant.chat(mode="council", extension={"judge_model": JUDGE})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "The answer is 4"
    metadata = body["metadata"]
    council = metadata["council"]
    assert (metadata["model"], council["winner"]["model"], council["output"]) == \
        (A, A, "winner")
    assert {m["model"]: m["score"] for m in council["members"]} == {A: 9, B: 2, C: 2}
    assert council["judge"]["status"] == "ok"
    assert council["judge"]["model"] == JUDGE
    # Cost: every call made, the judge's included, as the ledger has it.
    rows = await ledger(pg, response.headers["x-request-id"], 4)
    assert sorted(r["model"] for r in rows) == sorted([A, B, C, JUDGE])
    assert sum(r["cost_usd"] for r in rows) == Decimal(metadata["cost_usd_exact"])
    assert body["usage"]["completion_tokens"] == sum(r["completion_tokens"] for r in rows)


async def test_a_council_member_timing_out_does_not_fail_the_request(
        tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(**_council_fake(slow=C))
    response = await tenant.chat(mode="council", extension={"judge_model": JUDGE})
    assert response.status_code == 200, response.text
    council = response.json()["metadata"]["council"]
    members = {m["model"]: m for m in council["members"]}
    assert (members[C]["status"], members[C]["error"]) == ("timeout", "attempt_timeout")
    assert "score" not in members[C]
    assert council["winner"]["model"] == A
    rows = await ledger(pg, response.headers["x-request-id"], 4)
    assert sum(r["cost_usd"] for r in rows) == \
        Decimal(response.json()["metadata"]["cost_usd_exact"])


async def test_a_council_below_quorum_fails_loudly(tenant: Tenant, fake: FakeAdmin) -> None:
    fake_config = _council_fake()
    for member in (A, B):
        fake_config["per_model"][member] = {"error_rate": 1.0, "error_status": 500}
    await fake.configure(**fake_config)
    response = await tenant.chat(mode="council", extension={"judge_model": JUDGE})
    assert response.status_code == 502, response.text
    assert response.json()["error"]["code"] == "council_quorum_lost"


async def test_a_streamed_council_shows_progress_then_streams_the_winner(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await fake.configure(**_council_fake())
    response = await tenant.chat(mode="council", stream=True,
                                 extension={"judge_model": JUDGE})
    assert response.status_code == 200
    events = sse_events(response.text)
    progress = [e for e in events if e.startswith(": progress")]
    assert any('"stage":"members"' in p for p in progress)
    assert any('"stage":"judging"' in p for p in progress)
    assert content_of(events) == "The answer is 4"
    assert events[-1] == "data: [DONE]"
    assert last_metadata(events)["council"]["winner"]["model"] == A
    # The official SDK reads the same stream (comments skipped).
    stream = await tenant.sdk.chat.completions.create(
        model="auto", stream=True, messages=[{"role": "user", "content": "two plus two"}],
        extra_headers={"x-switchyard-mode": "council"},
        extra_body={"switchyard": {"judge_model": JUDGE}})
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "The answer is 4"


async def test_a_council_can_return_a_synthesis(tenant: Tenant, fake: FakeAdmin,
                                                pg: asyncpg.Pool) -> None:
    await fake.configure(**_council_fake())
    response = await tenant.chat(mode="council", extension={
        "judge_model": JUDGE, "council_output": "synthesis"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "Together: the answer is 4"
    council = body["metadata"]["council"]
    assert council["output"] == "synthesis"
    assert council["synthesis"]["model"] == JUDGE
    rows = await ledger(pg, response.headers["x-request-id"], 5)
    assert sum(r["cost_usd"] for r in rows) == Decimal(body["metadata"]["cost_usd_exact"])


# --- client disconnect --------------------------------------------------------------------

@pytest.mark.parametrize("stream", [True, False])
async def test_a_client_leaving_cancels_every_attempt_in_flight(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin, stream: bool) -> None:
    await fake.configure(ttft_ms=5000)
    async with httpx.AsyncClient(base_url=gateway.url,
                                 headers=dict(tenant.http.headers)) as http:
        body = {"model": "auto", "stream": stream, "switchyard": {"routes": 3},
                "messages": [{"role": "user", "content": "leave"}]}
        with pytest.raises(httpx.ReadTimeout):
            await http.post("/v1/chat/completions", json=body, timeout=0.5,
                            headers={**QA, "x-switchyard-mode": "speculative"})
    # All three upstream calls are closed well before their first token was due.
    await eventually(lambda: _with_disconnects(fake, 3), timeout_s=3.0)


# --- bad input ----------------------------------------------------------------------------

@pytest.mark.parametrize(("mode", "extension", "status", "code", "param"), [
    ("turbo", None, 400, "unknown_mode", "x-switchyard-mode"),
    (None, {"mode": "turbo"}, 400, "unknown_mode", "switchyard.mode"),
    ("hedged", {"mode": "council"}, 400, "conflicting_mode", "x-switchyard-mode"),
    ("speculative", {"routes": 4}, 400, "not_enough_routes", "routes"),
    ("council", None, 400, "judge_required", "judge_model"),
    ("council", {"judge_model": "gpt-99"}, 404, "model_not_found", "switchyard.judge_model"),
    (None, {"routes": 0}, 422, "invalid_field", "switchyard.routes"),
    (None, {"hedge_percentile": 100}, 422, "invalid_field", "switchyard.hedge_percentile"),
    (None, {"speed": "max"}, 422, "invalid_field", "switchyard.speed"),
])
async def test_bad_mode_requests_get_a_clear_error(
        tenant: Tenant, fake: FakeAdmin, mode: str | None, extension: dict[str, Any] | None,
        status: int, code: str, param: str) -> None:
    response = await tenant.chat(mode=mode, extension=extension)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["code"], error["param"]) == (code, param)
    assert (await fake.stats())["requests_total"] == 0  # refused before any provider call


async def test_a_malformed_extension_and_a_raced_embedding_are_refused(
        tenant: Tenant, http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    response = await tenant.http.post("/v1/chat/completions", headers=QA, json={
        "model": "auto", "switchyard": "fast", "messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 422
    assert response.json()["error"]["param"] == "switchyard"
    embedding = await http.post("/v1/embeddings", json={
        "model": "text-embedding-3-small", "input": "x"},
        headers={"x-switchyard-mode": "speculative"})
    assert embedding.status_code == 400, embedding.text
    assert embedding.json()["error"]["code"] == "unsupported_mode"


async def test_modes_wait_for_nothing_when_every_route_is_open(
        tenant: Tenant, fake: FakeAdmin, breakers: Breakers) -> None:
    for route in (A, B, C):
        for _ in range(breakers.config.consecutive_failures):
            await breakers.record(route, success=False)
    await asyncio.sleep(0.1)  # past the router's breaker cache
    response = await tenant.chat(mode="speculative")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "circuit_open"
    assert (await fake.stats())["requests_total"] == 0
