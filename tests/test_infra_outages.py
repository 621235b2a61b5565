"""Our own infrastructure failing under load: every request accepted by the ingress ends with
its answer or an explicit error, never a hang, and never a stream that ends cleanly on a
truncated answer. Each scenario has a stack of its own, so the rest of the suite never sees
the outage."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from state.keys import create_key
from topics.settings import RouterSettings, Settings

DEADLINE_MS = 20_000  # each request's own deadline: a hang would run into it


@pytest.fixture
def outage_stack(tmp_path: Path) -> Iterator[tuple[LocalStack, Gateway]]:
    base = Settings(router=RouterSettings(shutdown_grace_s=3))
    with LocalStack.ephemeral(base) as stack:
        fake_port = free_port()
        settings = stack.settings.model_copy(update={
            "ingress": stack.settings.ingress.model_copy(update={"port": free_port()}),
            "fallback_upstream_url": f"http://127.0.0.1:{fake_port}/v1"})
        with Gateway(settings, tmp_path / "logs", fake_upstream_port=fake_port) as gateway:
            yield stack, gateway


async def _key(stack: LocalStack) -> str:
    conn = await asyncpg.connect(stack.settings.postgres.dsn)
    try:
        return (await create_key(conn, "outage"))[1]
    finally:
        await conn.close()


async def _one(http: httpx.AsyncClient, n: int) -> str:
    """How request `n` ended: "answered", or "HTTP <status> <code>", or "stream error <code>";
    a stream that ends without [DONE] or an error event is "truncated"."""
    body: dict[str, Any] = {"model": "gpt-4o-mini", "stream": n % 2 == 1,
                            "messages": [{"role": "user", "content": f"outage {n}"}]}
    async with http.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            error = (await response.aread()).decode()
            assert response.headers.get("retry-after") or response.status_code != 503, error
            code = httpx.Response(200, content=error).json()["error"]["code"]
            return f"HTTP {response.status_code} {code}"
        if not body["stream"]:
            await response.aread()
            return "answered"
        events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    if events and events[-1] == "data: [DONE]":
        return "answered"
    if events and '"error"' in events[-1]:
        return f"stream error {httpx.Response(200, content=events[-1][6:]).json()['error']['code']}"
    return "truncated"


async def test_redis_killed_and_restarted_leaves_no_request_hanging(
        outage_stack: tuple[LocalStack, Gateway]) -> None:
    stack, gateway = outage_stack
    key = await _key(stack)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=DEADLINE_MS / 1000 + 10,
                                 headers={"Authorization": f"Bearer {key}",
                                          "x-switchyard-timeout-ms": str(DEADLINE_MS)}) as http:
        fake_url = str(gateway.settings.fallback_upstream_url).removesuffix("/v1")
        async with httpx.AsyncClient(base_url=fake_url) as fake:
            await fake.put("/_fake/config",
                           json={"ttft_ms": 150, "inter_token_ms": 20, "tokens": 20})

        async def load() -> list[tuple[float, str]]:
            started = time.monotonic()

            async def timed(n: int) -> tuple[float, str]:
                await asyncio.sleep(n * 0.1)  # 10 requests a second, open loop
                t0 = time.monotonic()
                return t0 - started, await _one(http, n)

            return await asyncio.gather(*(timed(n) for n in range(60)))

        running = asyncio.create_task(load())
        await asyncio.sleep(2.0)
        stack.kill("redis")
        await asyncio.sleep(3.0)
        await asyncio.to_thread(stack.start_again, "redis")
        back_at = time.monotonic()
        outcomes = await asyncio.wait_for(running, timeout=DEADLINE_MS / 1000 + 30)

        # Answers after Redis is back: every request a client sends is served again.
        recovered = None
        for _ in range(40):
            if await _one(http, 0) == "answered" and await _one(http, 1) == "answered":
                recovered = time.monotonic() - back_at
                break
            await asyncio.sleep(0.25)

    ends = Counter(end for _, end in outcomes)
    print(f"outcomes: {dict(ends)}; answering again {recovered} s after Redis came back")
    assert "truncated" not in ends
    allowed = {"answered", "HTTP 503 reply_channel_lost", "HTTP 503 reply_channel_unavailable",
               "HTTP 503 state_unavailable", "stream error reply_channel_lost"}
    assert set(ends) <= allowed, ends
    assert ends["answered"] >= 20  # before the kill, and after the restart
    assert recovered is not None
    assert recovered < 10
