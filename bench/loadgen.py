"""An open-loop load generator: requests leave on a fixed schedule whatever the server does,
and each latency is measured from its *scheduled* send time, so queueing is never hidden
(no coordinated omission)."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np
import orjson


@dataclass
class Result:
    label: str
    rate: float
    duration_s: float
    latencies_ms: list[float] = field(default_factory=list)
    ttfts_ms: list[float] = field(default_factory=list)
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.latencies_ms) + self.errors

    @property
    def achieved_rps(self) -> float:
        return len(self.latencies_ms) / self.duration_s

    def pct(self, q: float, ttft: bool = False) -> float:
        values = self.ttfts_ms if ttft else self.latencies_ms
        return float(np.percentile(values, q)) if values else float("nan")


async def run_open_loop(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                        body: dict[str, Any], *, rate: float, duration_s: float, label: str,
                        stream: bool = False) -> Result:
    result = Result(label=label, rate=rate, duration_s=duration_s)
    payload = orjson.dumps(body)
    # perf_counter, not loop.time(): uvloop's clock has a 1 ms resolution.
    start = time.perf_counter() + 0.05
    total = int(rate * duration_s)
    tasks = []
    for i in range(total):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(
            _one(session, url, headers, payload, scheduled, stream, result)))
    await asyncio.gather(*tasks)
    return result


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               payload: bytes, scheduled: float, stream: bool, result: Result) -> None:
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            if resp.status != 200:
                result.errors += 1
                if len(result.error_samples) < 5:
                    result.error_samples.append(f"{resp.status} {(await resp.text())[:200]}")
                return
            if stream:
                ttft = None
                async for line in resp.content:
                    if ttft is None and line.startswith(b"data:") and b'"content":"' in line \
                            and b'"content":""' not in line:
                        ttft = (time.perf_counter() - scheduled) * 1000
                    if line.startswith(b"data: [DONE]"):
                        break
                else:
                    raise RuntimeError("stream ended without [DONE]")
                if ttft is not None:
                    result.ttfts_ms.append(ttft)
            else:
                await resp.read()
        result.latencies_ms.append((time.perf_counter() - scheduled) * 1000)
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(repr(exc)[:200])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far (Linux /proc):
    PostgreSQL's work happens in backends that are children of the postmaster."""
    total = 0.0
    for proc in _tree(pid):
        try:
            with open(f"/proc/{proc}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue  # exited meanwhile
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as f:
                    todo.extend(int(child) for child in f.read().split())
        except FileNotFoundError:
            continue
    return found


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
