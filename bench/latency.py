"""Added latency of the gateway: the same open-loop load straight at the fake upstream and
through Switchyard (HTTP → Kafka → router → upstream → Redis → HTTP), alternated in one run.

    python -m bench.latency [--duration 20] [--rates 50,200] [--stream-rates 50,200]

Writes its section of bench/RESULTS.md (between its markers) and prints the tables.
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx

from bench.loadgen import Result, cpu_seconds, run_open_loop, single_upstream_gateway

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- bench.latency:start -->", "<!-- bench.latency:end -->"
MESSAGES = [{"role": "user", "content": "bench hello there"}]


async def main(args: argparse.Namespace) -> None:
    async with single_upstream_gateway(lambda line: print(line, file=sys.stderr)) as served:
        report = await _measure(args, served.url, served.fake_url, served.api_key,
                                served.pids)
    command = "python -m bench.latency " + " ".join(sys.argv[1:])
    section = _render(report, command.strip(), args)
    print(section)
    _write_section(section)


Report = list[tuple[str, Result, Result, dict[str, float], int]]


async def _measure(args: argparse.Namespace, gateway_url: str, fake_url: str, api_key: str,
                   pids: dict[str, int]) -> Report:
    gateway = (f"{gateway_url}/v1/chat/completions", {"Authorization": f"Bearer {api_key}",
                                                      "Content-Type": "application/json"})
    direct = (f"{fake_url}/v1/chat/completions", {"Content-Type": "application/json"})
    report: Report = []
    async with httpx.AsyncClient(base_url=fake_url) as admin, aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            timeout=aiohttp.ClientTimeout(total=60)) as session:

        async def phase(label: str, rate: float, stream: bool, tokens: int) -> None:
            await admin.put("/_fake/config", json={"tokens": tokens,
                                                   "inter_token_ms": 1 if stream else 0})
            body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}
            results = []
            for name, (url, headers) in (("direct", direct), ("switchyard", gateway)):
                # warm-up, not recorded: connection pools, JIT-less caches, Kafka metadata
                await run_open_loop(session, url, headers, body, rate=min(rate, 50),
                                    duration_s=2, label="warmup", stream=stream)
                before = _cpu(pids)
                results.append(await run_open_loop(session, url, headers, body, rate=rate,
                                                   duration_s=args.duration, label=name,
                                                   stream=stream))
                if name == "switchyard":
                    after = _cpu(pids)
                    cpu = {n: after[n] - before[n] for n in after}
            report.append((label, results[0], results[1], cpu, results[1].sent))

        for rate in args.rates:
            await phase(f"non-streaming, {rate:g} req/s", rate, False, 16)
        for rate in args.stream_rates:
            await phase(f"streaming 100 tokens, {rate:g} req/s", rate, True, 100)
    return report


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _render(report: Report, command: str, args: argparse.Namespace) -> str:
    lines = [START, "## Foundation: added latency (issue 2)", "",
             f"Command: `{command}` ({args.duration:g} s per phase, open loop, latency from "
             "each request's scheduled send time; direct and gateway phases alternate in one "
             "run).", "", _machine(), "",
             "| load | target | achieved req/s | errors | p50 ms | p90 ms | p99 ms | "
             "TTFT p50 ms | TTFT p99 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, direct, ours, _, _ in report:
        for r in (direct, ours):
            stream = bool(r.ttfts_ms)
            lines.append(
                f"| {label} | {r.label} | {r.achieved_rps:.1f} | {r.errors} | "
                f"{r.pct(50):.2f} | {r.pct(90):.2f} | {r.pct(99):.2f} | "
                + (f"{r.pct(50, True):.2f} | {r.pct(99, True):.2f} |" if stream else "– | – |"))
    lines += ["", "Added by Switchyard (gateway minus direct, same percentile):", "",
              "| load | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | CPU ms per request "
              "(all our processes + Kafka, Redis, PostgreSQL) |",
              "| --- | ---: | ---: | ---: | ---: | --- |"]
    for label, direct, ours, cpu, sent in report:
        stream = bool(ours.ttfts_ms)
        per_req = {n: 1000 * s / max(sent, 1) for n, s in cpu.items()}
        breakdown = ", ".join(f"{n} {v:.2f}" for n, v in sorted(per_req.items(),
                                                                key=lambda kv: -kv[1]))
        lines.append(
            f"| {label} | {ours.pct(50) - direct.pct(50):+.2f} | "
            f"{ours.pct(99) - direct.pct(99):+.2f} | "
            + (f"{ours.pct(50, True) - direct.pct(50, True):+.2f} | "
               f"{ours.pct(99, True) - direct.pct(99, True):+.2f} | " if stream else "– | – | ")
            + f"**{sum(per_req.values()):.2f}** ({breakdown}) |")
    lines.append(END)
    return "\n".join(lines)


def _machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    redis = _version(["redis-server", "--version"])
    return (f"Machine: {cpu}, {_nproc()} cores, Python {platform.python_version()}, "
            f"Kafka 3.9.1 (KRaft), {redis}, PostgreSQL "
            f"{_version(['psql', '--version']).split()[-1]}; everything on one box; "
            f"run {time.strftime('%Y-%m-%d')}.")


def _nproc() -> int:
    import os

    return len(os.sched_getaffinity(0))


def _version(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True).stdout.strip()
    return out.split(" sha=")[0].replace("Redis server v=", "Redis ")


def _write_section(section: str, path: Path = RESULTS) -> None:
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section + rest.split(END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    rates: Callable[[str], list[float]] = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__)
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measured phase")
    p.add_argument("--rates", type=rates, default=[50.0, 200.0])
    p.add_argument("--stream-rates", type=rates, default=[50.0, 200.0])
    return p.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(_parse()))
