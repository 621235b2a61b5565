"""Transient provider faults on the real stack, driven through the official OpenAI SDK: what
the client gets, and what the fake upstream's call log says the router did about it.

A 429, a 5xx or a connection closed before the response headers is called again on the same
route, after a backoff or the provider's Retry-After, before the request fails over; a
Retry-After that does not fit is passed to the client instead of waited out. A stream that
ends after its finish_reason without `[DONE]` is a whole answer; a malformed event in the
middle of one is skipped. A provider that never answers costs the request's deadline, never
a hang. Each scenario is one row of FAULTS, run streamed and not; the requests are `fixed` to
one route so that the calls counted are that route's. Unit tests of the Retry-After parser
and the backoff bounds come last."""

from __future__ import annotations

import email.utils
import itertools
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx
import openai
import orjson
import pytest

from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.test_modes_e2e import QA, A, B, C, prefer
from topics.errors import RateLimited, SwitchyardError, UpstreamError
from workers.providers.errors import retry_after_s
from workers.router.retry import MIN_CALL_MS, RetryPolicy

MODEL = "gpt-4o-mini"
FIXED = {"x-switchyard-mode": "fixed"}
RETRIES = 2  # RouterSettings.route_retries' default: the gateway fixture's


@dataclass(frozen=True)
class Fault:
    knobs: dict[str, Any]
    calls: int  # to the route, first included
    status: int | None = None  # None: answered
    code: str | None = None
    retry_after: str | None = None  # the Retry-After header the client gets
    min_gap_s: float = 0.0  # between two calls to the route
    extra: dict[str, Any] = field(default_factory=dict)


FAULTS = {
    "429 once, Retry-After 2": Fault(
        {"fail_first": 1, "error_status": 429, "retry_after": "2"}, calls=2, min_gap_s=1.9),
    "429 persistent, no Retry-After": Fault(
        {"error_rate": 1.0, "error_status": 429}, calls=1 + RETRIES, status=429,
        code="upstream_rate_limited"),
    "429 with a Retry-After too long to wait": Fault(
        {"error_rate": 1.0, "error_status": 429, "retry_after": "30"}, calls=1, status=429,
        code="upstream_rate_limited", retry_after="30"),
    "500 once": Fault({"fail_first": 1}, calls=2),
    "503 persistent, Retry-After 1": Fault(
        {"error_rate": 1.0, "error_status": 503, "retry_after": "1"}, calls=1 + RETRIES,
        status=503, code="upstream_overloaded", retry_after="1", min_gap_s=0.9),
    "connection reset before the headers, once": Fault(
        {"fail_first": 1, "fail_mode": "reset"}, calls=2),
}


def _ask(word: str) -> list[Any]:
    return [{"role": "user", "content": f"{word} please"}]


async def _model_calls(fake: FakeAdmin, model: str = MODEL) -> list[dict[str, Any]]:
    return [c for c in (await fake.stats())["call_log"] if c["model"] == model]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", list(FAULTS))
async def test_a_transient_fault(client: openai.AsyncOpenAI, fake: FakeAdmin, name: str,
                                 stream: bool) -> None:
    fault = FAULTS[name]
    await fake.configure(**fault.knobs)
    messages = _ask("fault")
    t0 = time.monotonic()
    if fault.status is None:
        if stream:
            chunks = await client.chat.completions.create(
                model=MODEL, messages=messages, stream=True, extra_headers=FIXED)
            text = "".join([c.choices[0].delta.content or "" async for c in chunks
                            if c.choices])
        else:
            completion = await client.chat.completions.create(
                model=MODEL, messages=messages, extra_headers=FIXED)
            text = completion.choices[0].message.content or ""
        assert text == expected_content(messages, 16)
    else:
        with pytest.raises(openai.APIStatusError) as failure:
            await client.chat.completions.create(model=MODEL, messages=messages,
                                                 stream=stream, extra_headers=FIXED)
        assert (failure.value.status_code, failure.value.code) == (fault.status, fault.code)
        assert failure.value.response.headers.get("retry-after") == fault.retry_after
    elapsed = time.monotonic() - t0

    calls = await _model_calls(fake)
    assert len(calls) == fault.calls, calls
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(calls)]
    assert all(gap >= fault.min_gap_s for gap in gaps), gaps
    assert elapsed < 10  # backoffs are bounded: nothing waits anywhere near the deadline


async def test_retries_are_attempts_of_their_own_in_metadata_and_ledger(
        client: openai.AsyncOpenAI, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(fail_first=1)
    raw = await client.chat.completions.with_raw_response.create(
        model=MODEL, messages=_ask("ledger"), extra_headers=FIXED)
    attempts = orjson.loads(raw.content)["metadata"]["attempts"]
    assert [(a["attempt"], a["status"], a.get("error")) for a in attempts] == \
        [(1, "error", "upstream_server_error"), (2, "ok", None)]
    request_id = raw.headers["x-request-id"]

    async def rows() -> list[asyncpg.Record] | None:
        found = await pg.fetch("SELECT attempt, status, cost_usd FROM usage_events "
                               "WHERE request_id = $1 ORDER BY attempt", request_id)
        return found if len(found) == 2 else None

    recorded = await eventually(rows)
    assert [(r["attempt"], r["status"]) for r in recorded] == [(1, "error"), (2, "ok")]
    assert recorded[0]["cost_usd"] == 0


async def test_a_retry_after_too_long_fails_over_at_once(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await create_key(pg, f"faults-{uuid.uuid4().hex[:8]}")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}", **QA}) as http:
        stored = await http.put("/v1/routing/policy", json={"allowed_models": [A, B, C]})
        assert stored.status_code == 200, stored.text
        await prefer(gateway, A)
        await fake.configure(per_model={A: {"error_rate": 1.0, "error_status": 429,
                                            "retry_after": "30"}})
        t0 = time.monotonic()
        response = await http.post("/v1/chat/completions", json={
            "model": "auto", "messages": _ask("elsewhere")})
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert [a["model"] for a in metadata["attempts"]][:1] == [A]
    assert metadata["model"] in (B, C)
    assert len(await _model_calls(fake, A)) == 1
    assert time.monotonic() - t0 < 5


async def test_a_provider_that_never_answers_costs_the_deadline_not_a_hang(
        http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    await fake.configure(error_rate=1.0, fail_mode="hang")
    for stream in (False, True):
        t0 = time.monotonic()
        response = await http.post(
            "/v1/chat/completions", headers={**FIXED, "x-switchyard-timeout-ms": "1500"},
            json={"model": MODEL, "stream": stream, "messages": _ask("silence")})
        elapsed = time.monotonic() - t0
        assert response.status_code == 504, response.text
        assert response.json()["error"]["code"] == "deadline_exceeded"
        assert 1.4 < elapsed < 5
    # The router hung up on the held calls: nothing stays open at the provider.
    await eventually(lambda: _disconnects(fake, 2), timeout_s=5)


async def _disconnects(fake: FakeAdmin, count: int) -> bool:
    return int((await fake.stats())["disconnects"]) >= count


async def test_a_malformed_event_mid_stream_is_skipped(
        gateway: Gateway, client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    await fake.configure(malformed_after_tokens=5, malformed_events=2)
    messages = _ask("bumpy")
    chunks = await client.chat.completions.create(
        model=MODEL, messages=messages, stream=True, extra_headers=FIXED,
        stream_options={"include_usage": True})
    received = [c async for c in chunks]
    text = "".join(c.choices[0].delta.content or "" for c in received if c.choices)
    assert text == expected_content(messages, 16)
    assert received[-1].usage is not None
    assert received[-1].usage.completion_tokens == 16
    assert len(await _model_calls(fake)) == 1
    await eventually(lambda: "malformed stream event" in
                     gateway.log_file("router-0").read_text(), timeout_s=5)
    assert "trunc" not in gateway.log_file("router-0").read_text()  # never the payload


async def test_a_stream_that_stays_broken_ends_in_an_error_event(
        http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    await fake.configure(malformed_after_tokens=5, malformed_events=10)
    async with http.stream("POST", "/v1/chat/completions", headers=FIXED, json={
            "model": MODEL, "stream": True, "messages": _ask("broken")}) as response:
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line.startswith("data:")]
    assert "data: [DONE]" not in events
    assert orjson.loads(events[-1][6:])["error"]["code"] == "upstream_bad_stream"


async def test_a_stream_without_done_is_a_whole_answer(
        http: httpx.AsyncClient, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(omit_done=True, tokens=7, prompt_tokens_override=31)
    messages = _ask("undone")
    async with http.stream("POST", "/v1/chat/completions", headers=FIXED, json={
            "model": MODEL, "stream": True, "messages": messages,
            "stream_options": {"include_usage": True}}) as response:
        assert response.status_code == 200
        events = [line async for line in response.aiter_lines() if line.startswith("data:")]
        request_id = response.headers["x-request-id"]
    assert events[-1] == "data: [DONE]"
    chunks = [orjson.loads(e[6:]) for e in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                   if c["choices"]) == expected_content(messages, 7)
    assert chunks[-1]["usage"]["prompt_tokens"] == 31
    assert chunks[-1]["usage"]["completion_tokens"] == 7

    async def row() -> asyncpg.Record | None:
        return await pg.fetchrow("SELECT status, prompt_tokens, estimated FROM usage_events "
                                 "WHERE request_id = $1", request_id)

    recorded = await eventually(row)
    assert (recorded["status"], recorded["prompt_tokens"], recorded["estimated"]) == \
        ("ok", 31, False)


# --- units ----------------------------------------------------------------------------------

NOW = 1_750_000_000.0


@pytest.mark.parametrize(("headers", "seconds"), [
    ({"retry-after": "2"}, 2.0),
    ({"retry-after": " 0 "}, 0.0),
    ({"retry-after": "1.5"}, 1.5),
    ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
    ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),  # past: now
    ({"retry-after": "Wed, 21 Oct 2015 07:28:00"}, None),  # no zone: not an HTTP date
    ({"retry-after": "soon"}, None),
    ({"retry-after": ""}, None),
    ({"retry-after": "-5"}, None),
    ({"retry-after": "nan"}, None),
    ({"retry-after": "inf"}, None),
    ({"retry-after-ms": "250", "retry-after": "1"}, 0.25),  # OpenAI's, more precise
    ({"retry-after-ms": "-1", "retry-after": "1"}, 1.0),
    ({}, None),
])
def test_retry_after_parser(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after_s(headers, now=NOW) == seconds


POLICY = RetryPolicy(retries=3, base_ms=200, cap_ms=1000, retry_after_max_ms=5000)


@pytest.mark.parametrize(("retry", "low", "high"), [
    (1, 100, 200), (2, 200, 400), (3, 400, 800), (4, 500, 1000), (9, 500, 1000)])
def test_backoff_doubles_within_its_jitter_and_stops_at_the_cap(retry: int, low: float,
                                                                high: float) -> None:
    rng = random.Random(7)
    waits = [POLICY.backoff_ms(retry, rng) for _ in range(2000)]
    assert low <= min(waits)
    assert max(waits) <= high
    assert max(waits) - min(waits) > (high - low) * 0.9  # jittered across the whole band


def _transient(retry_after: float | None = None) -> SwitchyardError:
    return RateLimited("slow down", transient=True, retry_after_s=retry_after)


@pytest.mark.parametrize(("error", "retry", "left_ms", "waits"), [
    (_transient(), 1, 60_000, True),
    (_transient(), 3, 60_000, True),
    (_transient(), 4, 60_000, False),  # past the route's retries
    (_transient(2.0), 1, 60_000, True),
    (_transient(6.0), 1, 60_000, False),  # longer than retry_after_max_ms
    (_transient(2.0), 1, 2000 + MIN_CALL_MS - 1, False),  # would not fit the deadline
    (_transient(), 1, 150, False),  # no time left for a call
    (UpstreamError("cut", code="upstream_stream_cut"), 1, 60_000, False),  # not transient
])
def test_a_route_is_called_again_only_when_the_wait_fits(
        error: SwitchyardError, retry: int, left_ms: float, waits: bool) -> None:
    wait = POLICY.wait_ms(error, retry, left_ms, random.Random(1))
    assert (wait is not None) is waits
    if wait is not None and error.retry_after_s is not None:
        assert wait == error.retry_after_s * 1000


def test_retry_after_travels_in_the_error_frame() -> None:
    error = RateLimited("slow down", code="upstream_rate_limited", retry_after_s=2.5)
    back = SwitchyardError.from_frame_data(orjson.loads(orjson.dumps(error.to_frame_data())))
    assert (type(back), back.code, back.retry_after_s) == (RateLimited, error.code, 2.5)
    assert SwitchyardError.from_frame_data(RateLimited("x").to_frame_data()).retry_after_s \
        is None
