"""Switchyard against LiteLLM proxy, side by side, with the fake upstream called directly as the
baseline: the same load through each, alternated phase by phase in one run so drift on the box
affects all three alike.

    python -m bench.compare [--quick] [--phase-s 20] [--rates 50,100,200,400,800] ...

Tests: open-loop non-streaming at fixed rates; open-loop streaming (100-token answers, one token
per millisecond from the fake); a closed loop at 64 connections (maximum throughput); CPU per
1,000 requests for every process from /proc; resident memory before and after a long phase
(100,000 requests through Switchyard by default). LiteLLM is installed into its own virtual
environment (bench/peer.py). Writes its section of bench/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.closed_loop import run_closed_loop
from bench.compare_report import Memory, Phase, Report, render
from bench.loadgen import (
    Result,
    box_busy_s,
    cpu_seconds,
    machine,
    process_tree,
    rss_mb,
    run_open_loop,
    write_section,
)
from bench.peer import LiteLLM, ensure_installed, installed_version
from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from state.keys import create_key
from topics.catalog import load_catalog

RESULTS = Path(__file__).with_name("RESULTS.md")
START, END = "<!-- compare:start -->", "<!-- compare:end -->"
MESSAGES = [{"role": "user", "content": "bench hello there"}]
TARGETS = ("direct", "switchyard", "litellm")
# Processes whose CPU counts for each target (by name prefix); the fake upstream and the load
# generator are shown apart.
OURS = ("ingress", "classifier", "router", "usage", "kafka", "redis", "postgres")
Target = tuple[str, dict[str, str]]  # URL, headers


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(args: argparse.Namespace) -> None:
    load_before = os.getloadavg()[0]
    _raise_fd_limit()
    install = ensure_installed(log=log)
    if install.seconds is None:
        log(f"peer: litellm {install.version} already installed")
    with LocalStack.ephemeral(log=log) as stack:
        fake_port = free_port()
        fake = f"http://127.0.0.1:{fake_port}"
        catalog = load_catalog(stack.settings.catalog_path)
        openai_env = catalog.providers["openai"].api_key_env
        settings = stack.settings.model_copy(update={
            "ingress": stack.settings.ingress.model_copy(update={
                "port": free_port(), "workers": args.ingress_procs}),
            "provider_base_urls": {"openai": f"{fake}/v1"},
            "fallback_upstream_url": f"{fake}/v1",
        })
        logs = Path(tempfile.mkdtemp(prefix="switchyard-compare-"))
        api_key = asyncio.run(_api_key(settings.postgres.owner_dsn))
        with Gateway(settings, logs, routers=args.routers, fake_upstream_port=fake_port,
                     extra_env={openai_env: "env-key-openai"}, log=log) as gateway, \
                LiteLLM(fake, logs, workers=args.peer_workers, log=log) as peer:
            pids = {name: p.pid for name, p in gateway.processes.items()}
            pids |= stack.pids() | {"litellm": peer.pid}
            targets: dict[str, Target] = {
                "direct": (f"{fake}/v1/chat/completions", {"Content-Type": "application/json"}),
                "switchyard": (f"{gateway.url}/v1/chat/completions",
                               {"Authorization": f"Bearer {api_key}",
                                "Content-Type": "application/json"}),
                "litellm": (f"{peer.url}/v1/chat/completions", peer.headers),
            }
            report = Report(
                command="python -m bench.compare " + " ".join(sys.argv[1:]),
                machine=machine(load_before), versions=_versions(install.seconds), args=args,
                classify_inline=settings.router.classify_inline)
            report.memory.append(Memory("fresh (no request yet)", _rss(pids)))
            import uvloop

            uvloop.run(_measure(args, targets, fake, pids, report))
    section = render(report)
    print(section)
    write_section(args.results, START, END, section)
    log(f"compare: wrote {args.results}")


async def _api_key(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        _, key = await create_key(conn, "bench-compare")
    finally:
        await conn.close()
    return key


async def _measure(args: argparse.Namespace, targets: dict[str, Target], fake: str,
                   pids: dict[str, int], report: Report) -> None:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=3)  # < servers' 5 s
    timeout = aiohttp.ClientTimeout(total=args.timeout_s)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def configure(tokens: int, inter_token_ms: float) -> None:
            async with session.put(f"{fake}/_fake/config", json={
                    "tokens": tokens, "inter_token_ms": inter_token_ms}) as resp:
                resp.raise_for_status()

        def body(stream: bool) -> dict[str, Any]:
            return {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}

        async def phase(test: str, load: str, stream: bool,
                        run: Callable[[str, Target], Awaitable[Result]]) -> None:
            for name in TARGETS:
                url, headers = targets[name]
                # Warm-up, not recorded: connection pools, caches, Kafka metadata.
                await run_open_loop(session, url, headers, body(stream), rate=25,
                                    duration_s=1, label="warmup", stream=stream)
                await _settle(pids)
                before, own_before = _cpu(pids), time.process_time()
                box_before, wall_before = box_busy_s(), time.monotonic()
                result = await run(name, targets[name])
                await _settle(pids)
                after, own_after = _cpu(pids), time.process_time()
                box, wall = box_busy_s() - box_before, time.monotonic() - wall_before
                cpu = {n: after[n] - before[n] for n in after if n in before}
                cpu["loadgen"] = own_after - own_before
                other_cores = max(0.0, box - sum(cpu.values())) / wall
                report.phases.append(Phase(test, load, name, result, cpu, other_cores))
                log(f"compare: {test} {load} {name}: {result.achieved_rps:.1f} req/s, "
                    f"{result.errors} errors, p50 {result.pct(50):.2f} ms, "
                    f"p99 {result.pct(99):.2f} ms, other load {other_cores:.2f} cores "
                    f"{result.error_samples[:1]}")

        def open_loop(rate: float, stream: bool) -> Callable[[str, Target], Awaitable[Result]]:
            async def run(name: str, target: Target) -> Result:
                return await run_open_loop(session, *target, body(stream), rate=rate,
                                           duration_s=args.phase_s, label=name, stream=stream)
            return run

        def closed_loop(concurrency: int) -> Callable[[str, Target], Awaitable[Result]]:
            async def run(name: str, target: Target) -> Result:
                return await run_closed_loop(session, *target, body(False),
                                             concurrency=concurrency,
                                             duration_s=args.phase_s, label=name)
            return run

        await configure(16, 0)
        if args.memory_requests > 0:
            # First, from fresh processes: an overloaded phase leaves its high-water mark.
            await _memory(args, session, targets, body(False), pids, report)
        for rate in args.rates:
            await phase("non-streaming", f"{rate:g} req/s", False, open_loop(rate, False))
        await configure(100, args.inter_token_ms)
        for rate in args.stream_rates:
            await phase("streaming", f"{rate:g} req/s", True, open_loop(rate, True))
        await configure(16, 0)
        await phase("closed loop", f"{args.concurrency} connections", False,
                    closed_loop(args.concurrency))
        await _settle(pids)
        report.memory.append(Memory("after every phase (overload included)", _rss(pids)))


async def _memory(args: argparse.Namespace, session: aiohttp.ClientSession,
                  targets: dict[str, Target], body: dict[str, Any], pids: dict[str, int],
                  report: Report) -> None:
    """One long phase per gateway (closed loop: as fast as it sustains, never overloaded);
    resident memory of every process after a warm-up (a tenth of the phase: pools, caches,
    the allocator's arenas and the JIT settle) and after the phase."""
    counts = {"switchyard": args.memory_requests, "litellm": args.peer_memory_requests}
    for name, count in counts.items():
        warmup = max(count // 10, 1000)
        await run_closed_loop(session, *targets[name], body,
                              concurrency=args.memory_concurrency, duration_s=3600,
                              label="warmup", max_requests=warmup)
        await _settle(pids)
        before = _rss(pids)
        result = await run_closed_loop(session, *targets[name], body,
                                       concurrency=args.memory_concurrency,
                                       duration_s=3600, label=name, max_requests=count)
        await _settle(pids)
        report.memory.append(Memory(f"{name}: after a warm-up of {warmup:,} requests", before))
        report.memory.append(Memory(f"{name}: after {result.sent:,} requests", _rss(pids)))
        report.long_phases.append(result)
        log(f"compare: long phase {name}: {result.sent} requests, {result.achieved_rps:.1f} "
            f"req/s, {result.errors} errors, p99 {result.pct(99):.2f} ms")


async def _settle(pids: dict[str, int], *, idle_cores: float = 0.3,
                  max_wait_s: float = 120.0) -> None:
    """Wait until every watched process together uses less than `idle_cores` (a backlog left
    by an overloaded phase must not bill, or slow down, the next)."""
    deadline = time.monotonic() + max_wait_s
    last = sum(_cpu(pids).values())
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        now = sum(_cpu(pids).values())
        if (now - last) / 0.5 < idle_cores:
            return
        last = now
    log(f"compare: still busy after {max_wait_s:.0f} s; going on")


def _cpu(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


def _rss(pids: dict[str, int]) -> dict[str, float]:
    """Resident MB per process (our Python processes: summed over the process tree, so an
    ingress with several uvicorn workers counts them all; PostgreSQL: the postmaster only, as
    its backends share memory)."""
    return {name: sum(rss_mb(p) for p in process_tree(pid)) if name not in ("postgres",)
            else rss_mb(pid) for name, pid in pids.items()}


def _versions(install_s: float | None) -> str:
    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                         capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                           text=True).stdout.strip()
    installed = ("already installed" if install_s is None
                 else f"installed in {install_s:.0f} s by this run")
    return (f"Switchyard {sha}{' (uncommitted changes in the tree)' if dirty else ''}; "
            f"LiteLLM proxy {installed_version()} (`litellm[proxy]` from PyPI in its own "
            f"venv, {installed}); Python {platform.python_version()}; aiohttp "
            f"{aiohttp.__version__} load generator in the same box.")


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    def floats(s: str) -> list[float]:
        return [float(x) for x in s.split(",") if x]

    p = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 5 s phases, rates 100,400, streaming 50, 3,000 and 1,000 "
                   "requests for the memory phases (explicit flags still win)")
    p.add_argument("--phase-s", type=float, help="seconds per measured phase (default 20)")
    p.add_argument("--rates", type=floats, help="non-streaming rates (default 50,100,200,400,800)")
    p.add_argument("--stream-rates", type=floats, help="streaming rates (default 50,200)")
    p.add_argument("--inter-token-ms", type=float, default=1.0,
                   help="the fake's gap between streamed tokens (100 tokens per answer)")
    p.add_argument("--concurrency", type=int, default=64, help="closed-loop connections")
    p.add_argument("--memory-requests", type=int,
                   help="requests of Switchyard's long phase (default 100000; 0: skip both)")
    p.add_argument("--peer-memory-requests", type=int,
                   help="requests of LiteLLM's long phase (default 15000: it serves ~65 req/s "
                   "here, 100,000 would take 25 minutes)")
    p.add_argument("--memory-concurrency", type=int, default=16,
                   help="closed-loop connections of the long phases")
    p.add_argument("--timeout-s", type=float, default=30.0, help="client timeout per request")
    p.add_argument("--ingress-procs", type=int, default=1, help="Switchyard ingress processes "
                   "(uvicorn workers)")
    p.add_argument("--routers", type=int, default=1, help="Switchyard router processes")
    p.add_argument("--peer-workers", type=int, default=1, help="LiteLLM --num_workers")
    p.add_argument("--results", type=Path, default=RESULTS, help="file to write the section to")
    args = p.parse_args(argv)
    quick = args.quick
    args.phase_s = args.phase_s or (5.0 if quick else 20.0)
    args.rates = args.rates or ([100.0, 400.0] if quick else [50.0, 100.0, 200.0, 400.0, 800.0])
    args.stream_rates = args.stream_rates or ([50.0] if quick else [50.0, 200.0])
    if args.memory_requests is None:
        args.memory_requests = 3000 if quick else 100_000
    if args.peer_memory_requests is None:
        args.peer_memory_requests = 1000 if quick else 15_000
    return args


if __name__ == "__main__":
    main(parse())
