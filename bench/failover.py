"""The provider fault catalogue, one scenario at a time, through the official OpenAI SDK
against the real stack: each fault injected into the fake upstream for the primary model,
with a fallback chain (`models`) and without one. Records, per scenario, the calls the
primary and the fallback got, what the client saw, and how long it took; then a primary
that is down for a while and comes back, over a stream of requests.

    python -m bench.failover [--outage-s 60] [--no-write]

The routers run with short provider timeouts (first byte 5 s, idle 3 s) so that the silent
and stalling providers end in seconds. Writes its section of bench/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
from redis.asyncio import Redis

from bench.loadgen import machine, single_upstream_gateway, write_section
from state.breakers import KEY_PREFIX as BREAKER_KEYS
from state.redis_client import make_redis
from topics.settings import RouterSettings

RESULTS = Path(__file__).with_name("RESULTS.md")
PRIMARY, FALLBACK = "gpt-4o-mini", "gpt-4.1-mini"  # one fake; the fallback's window is larger
HELLO: Any = [{"role": "user", "content": "catalogue hello there"}]
LONG: Any = [{"role": "user", "content": "a long prompt " * 30}]
PREFILL: Any = [*HELLO, {"role": "assistant", "content": "Certainly! Here"}]
ROUTER = RouterSettings(upstream_ttft_timeout_s=5, upstream_idle_timeout_s=3,
                        shutdown_grace_s=5)


@dataclass(frozen=True)
class Scenario:
    name: str
    knobs: dict[str, Any]  # the primary's faults (per_model), or fake-wide with "all"
    stream: bool = False
    messages: Any = field(default_factory=lambda: HELLO)
    fallback_knobs: dict[str, Any] = field(default_factory=dict)


CATALOGUE = [
    Scenario("429 once, Retry-After: 2", {"fail_first": 1, "error_status": 429,
                                         "retry_after": "2"}),
    Scenario("429 persistent, no Retry-After", {"error_rate": 1, "error_status": 429}),
    Scenario("500 once, then healthy", {"fail_first": 1, "error_status": 500}),
    Scenario("503 persistent", {"error_rate": 1, "error_status": 503}),
    Scenario("TCP reset before headers, once", {"fail_first": 1, "fail_mode": "reset"}),
    Scenario("no response at all", {"error_rate": 1, "fail_mode": "hang"}),
    Scenario("first token after 20 s", {"ttft_ms": 20_000}, stream=True),
    Scenario("stream cut after 40 of 60 tokens", {"tokens": 60, "cut_after_tokens": 40},
             stream=True),
    Scenario("stall mid-stream (10 s between tokens)", {"tokens": 60, "inter_token_ms": 10_000},
             stream=True),
    Scenario("malformed chunk mid-stream", {"tokens": 60, "malformed_after_tokens": 20},
             stream=True),
    Scenario("stream without [DONE]", {"omit_done": True}, stream=True),
    Scenario("400 context length exceeded", {"context_window": 20}, messages=LONG),
    Scenario("400 content filter", {"content_filter": True}),
    Scenario("fallback rejects an assistant prefill", {"error_rate": 1, "error_status": 503},
             messages=PREFILL, fallback_knobs={"rejects_prefill": True}),
]


@dataclass
class Row:
    scenario: str
    chain: bool
    primary_calls: int
    fallback_calls: int
    outcome: str
    seconds: float


async def run(args: argparse.Namespace) -> str:
    async with single_upstream_gateway(lambda line: None, ROUTER) as served, \
            httpx.AsyncClient(base_url=served.fake_url, timeout=30) as fake:
        sdk = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=served.api_key,
                                 max_retries=0, timeout=120)
        redis = make_redis(served.settings.redis)
        rows = []
        for scenario in CATALOGUE:
            for chain in (True, False):
                await _close_breakers(redis)  # each scenario starts from healthy routes
                rows.append(await _one(sdk, fake, scenario, chain))
                print(_line(rows[-1]), flush=True)
        await _close_breakers(redis)
        timeline = await _outage(sdk, fake, args.outage_s)
        await sdk.close()
        await redis.aclose()
    return _report(rows, timeline, args.outage_s)


async def _close_breakers(redis: Redis) -> None:
    keys = [key async for key in redis.scan_iter(match=f"{BREAKER_KEYS}*")]
    if keys:
        await redis.delete(*keys)
    await asyncio.sleep(ROUTER.breaker_cache_ttl_s)  # routers' caches see it


async def _one(sdk: openai.AsyncOpenAI, fake: httpx.AsyncClient, scenario: Scenario,
               chain: bool) -> Row:
    await fake.post("/_fake/reset")
    knobs = {"per_model": {PRIMARY: scenario.knobs, FALLBACK: scenario.fallback_knobs}}
    (await fake.put("/_fake/config", json=knobs)).raise_for_status()
    extra = {"models": [FALLBACK]} if chain else None
    started = time.perf_counter()
    try:
        outcome = await _ask(sdk, scenario, extra)
    except openai.APIStatusError as exc:
        outcome = f"HTTP {exc.status_code} `{exc.code}`" + (
            f", Retry-After {exc.response.headers['retry-after']}"
            if "retry-after" in exc.response.headers else "")
    seconds = time.perf_counter() - started
    calls = (await fake.get("/_fake/stats")).json()["calls_by_model"]
    return Row(scenario.name, chain, calls.get(PRIMARY, 0), calls.get(FALLBACK, 0), outcome,
               seconds)


async def _ask(sdk: openai.AsyncOpenAI, scenario: Scenario, extra: dict[str, Any] | None
               ) -> str:
    if not scenario.stream:
        completion = await sdk.chat.completions.create(
            model=PRIMARY, messages=scenario.messages, extra_body=extra)
        metadata: Any = getattr(completion, "metadata", None)
        return f"answered by {metadata['model']}"
    text, model = "", None
    try:
        async for chunk in await sdk.chat.completions.create(
                model=PRIMARY, messages=scenario.messages, stream=True,
                stream_options={"include_usage": True}, extra_body=extra):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            model = (chunk.model_extra or {}).get("metadata", {}).get("model") or model
    except openai.APIStatusError:
        raise  # refused before the stream started: an HTTP status
    except openai.APIError as exc:  # an SSE error event after the stream started
        return f"{len(text.split())} tokens, then SSE error `{exc.code}`"
    return f"streamed {len(text.split())} tokens by {model}, [DONE]"


async def _outage(sdk: openai.AsyncOpenAI, fake: httpx.AsyncClient, outage_s: float
                  ) -> list[tuple[float, str]]:
    """The primary down for `outage_s`, then healthy; one request every outage_s / 15 s
    over outage_s * 4 / 3 s (20 requests): who served each, and when."""
    await fake.post("/_fake/reset")
    await fake.put("/_fake/config", json={"fail_models": [PRIMARY], "error_status": 503})
    every_s, served = outage_s / 15, []
    t0 = time.perf_counter()
    healed = False
    for i in range(20):
        await asyncio.sleep(max(t0 + i * every_s - time.perf_counter(), 0))
        if not healed and time.perf_counter() - t0 >= outage_s:
            await fake.put("/_fake/config", json={"fail_models": []})
            healed = True
        try:
            completion = await sdk.chat.completions.create(
                model=PRIMARY, messages=HELLO, extra_body={"models": [FALLBACK]})
            metadata: Any = getattr(completion, "metadata", None)
            served.append((time.perf_counter() - t0, str(metadata["model"])))
        except openai.APIStatusError as exc:
            served.append((time.perf_counter() - t0, f"HTTP {exc.status_code}"))
    return served


def _line(row: Row) -> str:
    return (f"| {row.scenario} | {'yes' if row.chain else 'no'} | {row.primary_calls} | "
            f"{row.fallback_calls} | {row.outcome} | {row.seconds:.2f} |")


def _report(rows: list[Row], timeline: list[tuple[float, str]], outage_s: float) -> str:
    back = next((t for t, model in timeline if t >= outage_s and model == PRIMARY), None)
    during = [model for t, model in timeline if t < outage_s]
    after = [model for t, model in timeline if t >= outage_s]
    lines = [
        "### Provider fault catalogue (`python -m bench.failover`)", "",
        f"{machine().rstrip('.')}. Primary `{PRIMARY}`, fallback `{FALLBACK}`, one fake "
        "upstream; the fault is injected for the primary only (except where the fallback's "
        "own refusal is the point). Through the official OpenAI SDK, no client retries; "
        "routers with first-byte timeout 5 s, idle timeout 3 s, `route_retries` 2. "
        "\"chain\": the request sends `models: [fallback]`.", "",
        "| scenario | chain | primary calls | fallback calls | what the client got | s |",
        "| --- | --- | ---: | ---: | --- | ---: |",
        *map(_line, rows), "",
        f"Primary down for {outage_s:.0f} s, then healthy, one request every "
        f"{outage_s / 15:.1f} s with the chain: during the outage "
        f"{during.count(FALLBACK)}/{len(during)} answered by the fallback "
        f"({len(during) - during.count(FALLBACK) - during.count(PRIMARY)} errors); after it "
        f"{after.count(PRIMARY)}/{len(after)} by the primary, the first "
        + (f"{back - outage_s:.1f} s after it came back." if back is not None
           else "never (within the run)."),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outage-s", type=float, default=60.0)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(report)
    if not args.no_write:
        write_section(RESULTS, "<!-- bench.failover:start -->", "<!-- bench.failover:end -->",
                      report)


if __name__ == "__main__":
    main()
