"""A closed-loop load generator: `concurrency` workers, each sending its next request as soon as
the previous one is answered, for `duration_s` seconds. What it measures is the maximum
throughput a server sustains at that concurrency, and the latency it gives meanwhile (each from
the request's actual send time: in a closed loop nothing waits to be sent).

Its figures are `bench.loadgen.Result`s, like the open loop's, so both render alike.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import orjson

from bench.loadgen import Result


async def run_closed_loop(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                          body: dict[str, Any], *, concurrency: int, duration_s: float,
                          label: str, stream: bool = False,
                          max_requests: int | None = None) -> Result:
    """Run `concurrency` workers for `duration_s` (or until `max_requests` were sent); requests
    still running at the end are finished and counted, and `Result.duration_s` is the time
    until the last one ended."""
    result = Result(label=label, rate=float("nan"), duration_s=duration_s)
    payload = orjson.dumps(body)
    started = time.perf_counter()
    stop_at = started + duration_s
    budget = [max_requests if max_requests is not None else -1]

    async def worker() -> None:
        while time.perf_counter() < stop_at and budget[0] != 0:
            budget[0] -= 1
            await send(session, url, headers, payload, stream, result)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.duration_s = time.perf_counter() - started
    result.rate = result.sent / result.duration_s
    return result


async def send(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               payload: bytes, stream: bool, result: Result) -> None:
    """One request, timed from now; its latency (and time to first content token when
    streamed) or its failure goes into `result`."""
    sent = time.perf_counter()
    ttft = None
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            if resp.status != 200:
                _fail(result, f"{resp.status} {(await resp.read())[:200]!r}")
                return
            if stream:
                async for line in resp.content:
                    if ttft is None and line.startswith(b"data:") and _has_content(line):
                        ttft = (time.perf_counter() - sent) * 1000
                    if line.startswith(b"data: [DONE]"):
                        break
                else:
                    raise RuntimeError("stream ended without [DONE]")
                if ttft is not None:
                    result.ttfts_ms.append(ttft)
            else:
                await resp.read()
        result.latencies_ms.append((time.perf_counter() - sent) * 1000)
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        _fail(result, repr(exc)[:200])


def _has_content(line: bytes) -> bool:
    return b'"content":"' in line and b'"content":""' not in line


def _fail(result: Result, reason: str) -> None:
    result.errors += 1
    if len(result.error_samples) < 5:
        result.error_samples.append(reason)
