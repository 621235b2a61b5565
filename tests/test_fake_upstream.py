"""The fake upstream must be indistinguishable from OpenAI to the official SDK."""

from __future__ import annotations

import asyncio
import math
import random
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from compose.fake_judge import verdict
from compose.fake_scenario import Failure, admit
from compose.fake_state import STATE_KEY, FakeConfig
from compose.fake_upstream import FakeUpstream, expected_content, make_app

MODEL = "gpt-4o-mini"
MSGS: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there world"},
]
# 2 + 3 words, plus 4 per message.
MSGS_PROMPT_TOKENS = 13


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeUpstream]:
    async with FakeUpstream(FakeConfig(tokens=5)) as upstream:
        yield upstream


@pytest_asyncio.fixture
async def client(fake: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    # Retries would multiply every deliberate error and hide what the fake really sent.
    sdk = openai.AsyncOpenAI(base_url=fake.url, api_key="sk-test", max_retries=0)
    yield sdk
    await sdk.close()


async def _wait_for(predicate: Any, within: float = 2.0) -> float:
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > within:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)
    return time.monotonic() - start


def test_expected_content_rules() -> None:
    assert expected_content([{"role": "user", "content": "  hi you"}], 2) == "hi-0 hi-1 "
    parts = [
        {"type": "text", "text": "multi"},
        {"type": "image_url", "image_url": {}},
        {"type": "text", "text": "part more"},
    ]
    assert expected_content([{"role": "user", "content": parts}], 1) == "multipart-0 "
    assert expected_content([{"role": "system", "content": "x"}], 1) == "empty-0 "
    assert expected_content([{"role": "user", "content": "   "}], 1) == "empty-0 "
    last_user_wins = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    assert expected_content(last_user_wins, 1) == "c-0 "


async def test_non_stream_completion(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.object == "chat.completion"
    assert resp.id.startswith("chatcmpl-")
    assert resp.model == MODEL
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == expected_content(MSGS, 5)
    assert choice.message.content == "hello-0 hello-1 hello-2 hello-3 hello-4 "
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    assert resp.usage.prompt_tokens == MSGS_PROMPT_TOKENS
    assert resp.usage.total_tokens == MSGS_PROMPT_TOKENS + 5
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0


async def test_stream_with_usage(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert len(chunks) == 1 + 5 + 1 + 1
    assert {c.id for c in chunks} == {chunks[0].id}
    assert all(c.object == "chat.completion.chunk" and c.model == MODEL for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].choices[0].delta.content == ""
    contents = [c.choices[0].delta.content for c in chunks[1:6]]
    assert contents == [f"hello-{i} " for i in range(5)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == expected_content(MSGS, 5)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * 6 + ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (
        MSGS_PROMPT_TOKENS,
        5,
        MSGS_PROMPT_TOKENS + 5,
    )
    assert fake.stats.completed_streams == 1
    assert fake.stats.open_streams == 0


async def test_stream_raw_wire_format(fake: FakeUpstream) -> None:
    async def events(body: dict[str, Any]) -> list[str]:
        async with (
            aiohttp.ClientSession() as http,
            http.post(f"{fake.url}/chat/completions", json=body) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/event-stream")
            text = (await resp.read()).decode()
        assert text.endswith("\n\n")
        return [e.removeprefix("data: ") for e in text.strip().split("\n\n")]

    body: dict[str, Any] = {"model": MODEL, "messages": MSGS, "stream": True}
    plain = await events(body)
    assert plain[-1] == "[DONE]"
    parsed = [orjson.loads(e) for e in plain[:-1]]
    assert all("usage" not in p for p in parsed)
    assert parsed[-1]["choices"] == [
        {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}
    ]

    with_usage = await events({**body, "stream_options": {"include_usage": True}})
    parsed = [orjson.loads(e) for e in with_usage[:-1]]
    assert with_usage[-1] == "[DONE]"
    assert all("usage" in p and p["usage"] is None for p in parsed[:-1])
    assert parsed[-1]["choices"] == []
    assert parsed[-1]["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("limit_field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_gives_length(client: openai.AsyncOpenAI, limit_field: str) -> None:
    # extra_body puts the field on the wire verbatim, whichever spelling is parametrized.
    limit = {limit_field: 3}
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS, extra_body=limit)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == expected_content(MSGS, 3)
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 3

    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=limit,
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        expected_content(MSGS, 3)
    )
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3

    roomy = await client.chat.completions.create(
        model=MODEL, messages=MSGS, extra_body={limit_field: 5}
    )
    assert roomy.choices[0].finish_reason == "stop"


async def test_cached_and_overridden_prompt_tokens(
    client: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.configure(cached_tokens=7, prompt_tokens_override=100)
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 7
    assert (resp.usage.prompt_tokens, resp.usage.total_tokens) == (100, 105)


async def test_error_rate_raises_internal_server_error(
    client: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.configure(error_rate=1.0)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MSGS)
    err = info.value
    assert err.status_code == 500
    assert "The server had an error while processing your request" in err.message
    assert err.type == "server_error"
    # The SDK hands over the inner object, not the {"error": ...} envelope.
    assert isinstance(err.body, dict)
    assert set(err.body) == {"message", "type", "param", "code"}
    assert fake.stats.errors_sent == 1

    fake.configure(error_status=502)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MSGS, stream=True)
    assert info.value.status_code == 502


async def test_error_rate_is_seeded(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    async def outcomes() -> list[bool]:
        result = []
        for _ in range(30):
            try:
                await client.chat.completions.create(model=MODEL, messages=MSGS)
                result.append(True)
            except openai.InternalServerError:
                result.append(False)
        return result

    # Setting a config restarts the error sequence, so the same knobs replay the same outcomes.
    fake.configure(error_rate=0.5, seed=42)
    first = await outcomes()
    fake.reset()
    fake.configure(error_rate=0.5, seed=42)
    assert await outcomes() == first
    assert 0 < first.count(False) < 30
    assert fake.stats.errors_sent == first.count(False)


async def test_outage_gives_503(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.configure(outage=True)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert info.value.status_code == 503
    assert "overloaded" in info.value.message


async def test_cut_stream_is_visibly_incomplete(
    client: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    fake.configure(cut_after_tokens=2)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
    )
    received: list[ChatCompletionChunk] = []

    async def drain() -> None:
        async for chunk in stream:
            received.append(chunk)

    # Chunks before the cut are delivered, then iteration fails on the truncated chunked body.
    with pytest.raises(openai.APIConnectionError):
        await drain()
    assert "".join(c.choices[0].delta.content or "" for c in received) == "hello-0 hello-1 "
    assert all(c.choices and c.choices[0].finish_reason is None for c in received)
    assert (fake.stats.cut_streams, fake.stats.completed_streams, fake.stats.disconnects) == (
        1,
        0,
        0,
    )
    await _wait_for(lambda: fake.stats.open_streams == 0)


async def _disconnect_mid_stream(url: str, stats_of: Any) -> None:
    sdk = openai.AsyncOpenAI(base_url=url, api_key="x", max_retries=0)
    stream = await sdk.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        stream=True,
        extra_headers={"x-fake-config": '{"inter_token_ms": 2000, "tokens": 5}'},
    )
    await stream.__anext__()
    await stream.__anext__()
    assert stats_of().open_streams == 1
    await stream.close()
    # The server is sleeping 2 s before its next write, so only prompt detection passes
    # (1.5 s: margin for a loaded box, still short of that write).
    await _wait_for(lambda: stats_of().disconnects == 1, within=1.5)
    await sdk.close()
    assert stats_of().open_streams == 0
    assert stats_of().completed_streams == 0


async def test_client_disconnect_is_counted_promptly(fake: FakeUpstream) -> None:
    await _disconnect_mid_stream(fake.url, lambda: fake.stats)


async def test_disconnect_counted_without_handler_cancellation() -> None:
    app = make_app(FakeConfig())
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        await _disconnect_mid_stream(f"http://127.0.0.1:{port}/v1", lambda: app[STATE_KEY].stats)
    finally:
        await runner.cleanup()


async def test_request_id_and_authorization_tracking(
    client: openai.AsyncOpenAI, fake: FakeUpstream
) -> None:
    for rid in ("a", "b", "a"):
        await client.chat.completions.create(
            model=MODEL,
            messages=MSGS,
            extra_headers={"X-Client-Request-Id": rid},
        )
    await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert fake.stats.calls_by_request_id == {"a": 2, "b": 1}
    assert fake.stats.requests_total == 4
    assert fake.stats.last_authorization == "Bearer sk-test"


async def test_per_request_config_override(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    resp = await client.chat.completions.create(
        model=MODEL,
        messages=MSGS,
        extra_headers={"x-fake-config": '{"tokens": 2}'},
    )
    assert resp.choices[0].message.content == expected_content(MSGS, 2)
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.choices[0].message.content == expected_content(MSGS, 5)
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model=MODEL,
            messages=MSGS,
            extra_headers={"x-fake-config": '{"outage": true}'},
        )
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model=MODEL,
            messages=MSGS,
            extra_headers={"x-fake-config": '{"tokns": 2}'},
        )
    assert fake.config.tokens == 5


async def test_admin_routes_and_models(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == FakeConfig().models
    async with aiohttp.ClientSession(fake.base_url) as http:
        async with http.put("/_fake/config", json={"tokens": 3, "ttft_ms": 1}) as r:
            assert r.status == 200
            assert (await r.json())["tokens"] == 3
        for bad in ({"tokens": -1}, {"nope": 1}, [1]):
            async with http.put("/_fake/config", json=bad) as r:
                assert r.status == 400
                assert set((await r.json())["error"]) == {"message", "type", "param", "code"}
        async with http.get("/_fake/config") as r:
            assert (await r.json())["tokens"] == 3
        resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
        assert resp.choices[0].message.content == expected_content(MSGS, 3)
        async with http.get("/_fake/stats") as r:
            stats = await r.json()
            assert stats["requests_total"] == 1
        async with http.post("/_fake/reset") as r:
            assert r.status == 200
        async with http.get("/_fake/stats") as r:
            assert (await r.json())["requests_total"] == 0
        # Reset also restores the startup knobs, so tests sharing one fake start clean.
        async with http.get("/_fake/config") as r:
            assert (await r.json())["tokens"] == 5


async def test_command_line_server() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "compose.fake_upstream",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--tokens",
        "3",
        "--models",
        "m1,m2",
        "--cached-tokens",
        "2",
        "--per-model",
        '{"m2": {"answer": "fixed reply"}}',
    )
    sdk = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        for _ in range(100):
            try:
                models = await sdk.models.list()
                break
            except openai.APIConnectionError:
                await asyncio.sleep(0.05)
        assert [m.id for m in models.data] == ["m1", "m2"]
        resp = await sdk.chat.completions.create(model="m1", messages=MSGS)
        assert resp.choices[0].message.content == expected_content(MSGS, 3)
        resp = await sdk.chat.completions.create(model="m2", messages=MSGS)
        assert resp.choices[0].message.content == "fixed reply"
    finally:
        await sdk.close()
        proc.terminate()
        await proc.wait()


# --- per-model knobs, fixed answers, the judge, the latency tail ---------------------------

# The gateway's council judge prompt; only candidate 2 holds the key.
JUDGE_KEY = "Paris"
JUDGE_PROMPT = """Question: what is the capital of France?
Score each candidate from 0 to 10 and name the best one.
<<<candidate 1>>>
It is Lyon.
<<<end>>>
<<<candidate 2>>>
The capital is
paris, on the Seine.
<<<end>>>
<<<candidate 3>>>
I do not know.
<<<end>>>"""
JUDGE_REPLY = (
    '{"scores": [{"candidate": 1, "score": 2, "reason": "does not contain the expected answer"},'
    ' {"candidate": 2, "score": 9, "reason": "contains the expected answer"},'
    ' {"candidate": 3, "score": 2, "reason": "does not contain the expected answer"}],'
    ' "best": 2}')


def check_verdict(text: str) -> None:
    """The reply parses as the judge's JSON document and picks candidate 2."""
    assert text == JUDGE_REPLY
    verdict = orjson.loads(text)
    assert verdict["best"] == 2
    assert [s["score"] for s in verdict["scores"]] == [2, 9, 2]


async def _timed(coro: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = await coro
    return result, time.monotonic() - start


async def test_per_model_overrides(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.configure(per_model={"healthy": {"tokens": 2},
                              "broken": {"error_rate": 1, "error_status": 503},
                              "slow": {"ttft_ms": 300}})
    resp, fast_s = await _timed(client.chat.completions.create(model="healthy", messages=MSGS))
    assert resp.choices[0].message.content == expected_content(MSGS, 2)
    with pytest.raises(openai.InternalServerError) as info:
        await client.chat.completions.create(model="broken", messages=MSGS, stream=True)
    assert info.value.status_code == 503
    resp, slow_s = await _timed(client.chat.completions.create(model="slow", messages=MSGS))
    assert resp.choices[0].message.content == expected_content(MSGS, 5)  # the global tokens
    assert slow_s >= 0.29 > fast_s
    # A model without an entry keeps the global knobs; the request header beats per_model.
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.choices[0].message.content == expected_content(MSGS, 5)
    resp = await client.chat.completions.create(
        model="healthy", messages=MSGS, extra_headers={"x-fake-config": '{"tokens": 1}'})
    assert resp.choices[0].message.content == expected_content(MSGS, 1)
    # fail_models still works alongside per_model.
    fake.configure(fail_models=["healthy"])
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="healthy", messages=MSGS)
    assert fake.stats.calls_by_model == {"healthy": 3, "broken": 1, "slow": 1, MODEL: 1}


async def test_per_model_is_validated(fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession(fake.base_url) as http:
        bads: list[dict[str, Any]] = [{"m": {"tokens": -1}}, {"m": {"tokns": 1}},
                                      {"m": {"per_model": {}}}, {"m": 3}]
        for bad in bads:
            async with http.put("/_fake/config", json={"per_model": bad}) as r:
                assert r.status == 400, bad
        async with http.put("/_fake/config", json={"per_model": {"m": {"ttft_ms": "7"}}}) as r:
            assert (await r.json())["per_model"] == {"m": {"ttft_ms": 7.0}}
    assert fake.config.per_model == {"m": {"ttft_ms": 7.0}}


async def test_fixed_answer_round_trip(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    text = "The answer is  42, surely. "
    fake.configure(answer=text)
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS)
    assert resp.choices[0].message.content == text
    assert resp.usage is not None
    assert resp.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    pieces = [c.choices[0].delta.content for c in chunks[1:-2]]
    assert pieces == ["The ", "answer ", "is  ", "42, ", "surely. "]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    # A cap still cuts it, as it cuts generated text; JSON mode does not use it.
    resp = await client.chat.completions.create(model=MODEL, messages=MSGS, max_tokens=2)
    assert (resp.choices[0].message.content, resp.choices[0].finish_reason) == (
        "The answer ", "length")
    resp = await client.chat.completions.create(
        model=MODEL, messages=MSGS, response_format={"type": "json_object"})
    assert orjson.loads(resp.choices[0].message.content or "") == {"word": "hello", "tokens": 5}


async def test_judge_follows_the_rubric(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    fake.configure(per_model={"judge": {"judge_key": JUDGE_KEY.upper()}})
    judge_msgs: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "You are a strict judge."},
        {"role": "user", "content": JUDGE_PROMPT}]
    resp = await client.chat.completions.create(model="judge", messages=judge_msgs,
                                                max_tokens=5)
    check_verdict(resp.choices[0].message.content or "")
    assert resp.choices[0].finish_reason == "stop"
    stream = await client.chat.completions.create(
        model="judge", messages=judge_msgs, stream=True,
        response_format={"type": "json_object"})
    deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len([d for d in deltas if d]) > 3  # streamed in pieces, like any text
    check_verdict("".join(deltas))
    # Without candidate blocks the judge answers normally, and other models never judge.
    resp = await client.chat.completions.create(model="judge", messages=MSGS)
    assert resp.choices[0].message.content == expected_content(MSGS, 5)
    resp = await client.chat.completions.create(model=MODEL, messages=judge_msgs)
    assert resp.choices[0].message.content == expected_content(judge_msgs, 5)


def test_judge_with_no_match_picks_the_first() -> None:
    prompt = "<<<candidate 3>>>\nx\n<<<end>>>\n<<<candidate 4>>>\ny\n<<<end>>>"
    assert orjson.loads(verdict(prompt, "zzz") or "")["best"] == 3
    assert verdict("no blocks here", "zzz") is None


def test_ttft_draws_follow_the_seeded_rng() -> None:
    app = make_app(FakeConfig(ttft_ms=10, ttft_sigma=0.5, slow_rate=0.3, slow_factor=4,
                              seed=7))
    replica = random.Random(7)
    for _ in range(50):
        admitted = admit(make_mocked_request("POST", "/v1/chat/completions", app=app), "m")
        assert not isinstance(admitted, Failure)
        wait = 10 * math.exp(replica.gauss(0, 0.5))
        if replica.random() < 0.3:
            wait *= 4
        assert admitted[0].ttft_ms == pytest.approx(wait)
    # The lognormal keeps ttft_ms as its median.
    app = make_app(FakeConfig(ttft_ms=10, ttft_sigma=1))
    draws = []
    for _ in range(401):
        admitted = admit(make_mocked_request("POST", "/", app=app), None)
        assert not isinstance(admitted, Failure)
        draws.append(admitted[0].ttft_ms)
    assert 7 < statistics.median(draws) < 14
    assert max(draws) > 40
    assert min(draws) < 2.5
    # With the tail off the seeded sequence is untouched, as before the tail existed.
    app = make_app(FakeConfig(ttft_ms=10))
    rng_state = app[STATE_KEY].rng.getstate()
    admitted = admit(make_mocked_request("POST", "/", app=app), "m")
    assert not isinstance(admitted, Failure)
    assert admitted[0].ttft_ms == 10
    assert app[STATE_KEY].rng.getstate() == rng_state


async def test_slow_calls_have_a_heavy_tail(client: openai.AsyncOpenAI,
                                            fake: FakeUpstream) -> None:
    fake.configure(ttft_ms=5, slow_rate=0.3, slow_factor=10, seed=3)
    replica = random.Random(3)
    slow = [replica.random() < 0.3 for _ in range(40)]
    durations = [(await _timed(client.chat.completions.create(model=MODEL, messages=MSGS)))[1]
                 for _ in range(40)]
    # Slow calls sleep 50 ms, so they take at least 40 ms whatever the machine's load.
    assert all(d >= 0.04 for d, s in zip(durations, slow, strict=True) if s)
    assert 0 < sum(slow) < 20
    assert sum(d < 0.04 for d in durations) > 20


async def test_calls_by_model(client: openai.AsyncOpenAI, fake: FakeUpstream) -> None:
    for model in ("a", "b", "a"):
        await client.chat.completions.create(model=model, messages=MSGS)
    await client.embeddings.create(model="emb", input="x")
    async with aiohttp.ClientSession(fake.base_url) as http:
        async with http.post("/v1/chat/completions", data=b"not json") as r:
            assert r.status == 400  # counted in requests_total, with no model to count
        # A failed call still counts for its model, as calls_by_request_id counts it.
        fake.configure(outage=True)
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="a", messages=MSGS)
        async with http.get("/_fake/stats") as r:
            assert (await r.json())["calls_by_model"] == {"a": 3, "b": 1, "emb": 1}
        async with http.post("/_fake/reset") as r:
            assert (await r.json())["calls_by_model"] == {}
    assert fake.stats.requests_total == 0


async def test_transient_faults_and_the_call_log(client: openai.AsyncOpenAI,
                                                 fake: FakeUpstream) -> None:
    async with aiohttp.ClientSession(fake.base_url) as http:
        async with http.put("/_fake/config", json={"fail_first": 1, "error_status": 429,
                                                   "retry_after": "2"}) as r:
            assert r.status == 200
        with pytest.raises(openai.RateLimitError) as failure:
            await client.chat.completions.create(model="a", messages=MSGS)
        assert failure.value.response.headers["retry-after"] == "2"
        await client.chat.completions.create(model="a", messages=MSGS)  # once only, per model
        with pytest.raises(openai.RateLimitError):
            await client.chat.completions.create(model="b", messages=MSGS)
        async with http.get("/_fake/stats") as r:
            log = (await r.json())["call_log"]
    assert [(c["model"], c["fault"]) for c in log] == [("a", "status 429"), ("a", None),
                                                       ("b", "status 429")]
    assert log[0]["at"] <= log[1]["at"] <= log[2]["at"] <= time.time()

    fake.configure(fail_first=1, fail_mode="reset")  # setting the config starts a new count
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="a", messages=MSGS)
    fake.configure(fail_first=0, error_rate=1.0, fail_mode="hang")
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="a", messages=MSGS, timeout=0.3)
    await _wait_for(lambda: fake.stats.disconnects == 1)
    assert [c["fault"] for c in fake.stats.call_log[-2:]] == ["reset", "hang"]


async def test_a_stream_without_done_still_parses(client: openai.AsyncOpenAI,
                                                  fake: FakeUpstream) -> None:
    fake.configure(omit_done=True)
    async with aiohttp.ClientSession(fake.base_url) as http, http.post(
            "/v1/chat/completions", json={"model": MODEL, "messages": MSGS, "stream": True,
                                          "stream_options": {"include_usage": True}}) as r:
        raw = await r.read()
    assert b"[DONE]" not in raw
    assert raw.count(b'"finish_reason":"stop"') == 1
    stream = await client.chat.completions.create(
        model=MODEL, messages=MSGS, stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert chunks[-1].usage is not None
