"""A provider crashes under load: open loop at a fixed rate, `model: "auto"` across three
providers, each served by its own fake upstream process; one of them is SIGKILLed mid-run and
restarted (same port) later. Measures what clients see (failures, latency), how fast the
route's circuit breaker opens, how many requests failed over, and when traffic comes back.

    python -m bench.fault [--rate 100] [--duration 60] [--kill-at 20] [--restart-at 40]

Smoke run: `--duration 12 --kill-at 4 --restart-at 8 --rate 50 --no-write`. Writes its section
of bench/RESULTS.md (between its markers) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from bench.loadgen import (
    ROUTES,
    RoutedGateway,
    Sample,
    machine,
    metadata,
    routing_policy,
    run_open_loop,
    write_section,
)
from compose.stack import LocalStack

RESULTS = Path(__file__).with_name("RESULTS.md")
BODY = {"model": "auto", "messages": [{"role": "user", "content": "fault hello there"}]}
POLL_S = 0.05


@dataclass
class Run:
    t0: float = 0.0  # perf_counter() of the first scheduled request
    victim: str = ""
    killed: float = 0.0
    killed_wall_ms: float = 0.0
    restarted: float = 0.0  # the restarted fake answers again
    samples: list[Sample] = field(default_factory=list)
    # (perf_counter, state, opened_at_ms) of the victim's breaker, each change seen by the poll
    breaker: list[tuple[float, str, int | None]] = field(default_factory=list)
    polls: int = 0
    load_before: float = 0.0


async def main(args: argparse.Namespace) -> None:
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    flags = ["--ttft-ms", str(args.ttft_ms)]
    with LocalStack.ephemeral(log=log) as stack, \
            RoutedGateway(stack, flags, routers=args.routers, log=log) as bench:
        api_key = await bench.tenant(
            "bench-fault", routing_policy(latency_only=args.weights == "latency"))
        run = await _measure(args, bench, api_key)
    command = ("python -m bench.fault " + " ".join(sys.argv[1:])).strip()
    section = render(run, args, command)
    print(section)
    if not args.no_write:
        # One section per weighting, so both runs can be kept.
        name = "bench.fault" + ("" if args.weights == "default" else f".{args.weights}")
        write_section(RESULTS, f"<!-- {name}:start -->", f"<!-- {name}:end -->", section)


async def _measure(args: argparse.Namespace, bench: RoutedGateway, api_key: str) -> Run:
    run = Run(load_before=os.getloadavg()[0])
    url = f"{bench.url}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
               "x-switchyard-category": "question_answering"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        # warm-up, not recorded: connection pools, the bandit's posteriors, Kafka metadata
        await run_open_loop(session, url, headers, BODY, rate=min(args.rate, 50),
                            duration_s=args.warmup, label="warmup")
        run.t0 = time.perf_counter() + 0.05  # run_open_loop's first send
        chaos = asyncio.create_task(_chaos(args, bench, run))
        poll = asyncio.create_task(_poll(session, bench.url, headers, run))
        try:
            await run_open_loop(session, url, headers, BODY, rate=args.rate,
                                duration_s=args.duration, label="fault",
                                on_sample=run.samples.append)
            await chaos
        finally:
            poll.cancel()
            chaos.cancel()
    return run


async def _chaos(args: argparse.Namespace, bench: RoutedGateway, run: Run) -> None:
    await asyncio.sleep(max(run.t0 + args.kill_at - time.perf_counter(), 0))
    run.victim = args.kill or _busiest(run, args.kill_at - 5, args.kill_at)
    run.killed_wall_ms = time.time() * 1000
    run.killed = time.perf_counter()
    await asyncio.to_thread(bench.kill_fake, run.victim)
    print(f"fault: killed {run.victim}'s fake at {run.killed - run.t0:.2f} s", file=sys.stderr)
    await asyncio.sleep(max(run.t0 + args.restart_at - time.perf_counter(), 0))
    await asyncio.to_thread(bench.start_fake, run.victim)
    run.restarted = time.perf_counter()
    print(f"fault: {run.victim}'s fake answers again at {run.restarted - run.t0:.2f} s",
          file=sys.stderr)


def _busiest(run: Run, since_s: float, until_s: float) -> str:
    served = Counter(m["provider"] for s in run.samples
                     if since_s <= s.finished - run.t0 < until_s and (m := metadata(s)))
    return served.most_common(1)[0][0] if served else next(iter(ROUTES))


async def _poll(session: aiohttp.ClientSession, base: str, headers: dict[str, str],
                run: Run) -> None:
    """The victim's breaker as GET /v1/providers/stats shows it, every POLL_S."""
    last: str | None = None
    while True:
        started = time.perf_counter()
        if run.victim:
            async with session.get(f"{base}/v1/providers/stats", headers=headers) as resp:
                stats: dict[str, Any] = await resp.json()
            run.polls += 1
            view = next((b for b in stats.get("breakers", ())
                         if b["route"] == ROUTES[run.victim]), None)
            state = view["state"] if view else "closed"
            if state != last:
                run.breaker.append((time.perf_counter(), state,
                                    view.get("opened_at_ms") if view else None))
                last = state
        await asyncio.sleep(max(POLL_S - (time.perf_counter() - started), 0))


def render(run: Run, args: argparse.Namespace, command: str) -> str:
    meta = [(s, metadata(s)) for s in run.samples]
    ok = [(s, m) for s, m in meta if m is not None]
    failed = [s for s, m in meta if m is None]
    kill_s, back_s = run.killed - run.t0, run.restarted - run.t0
    opened = next(((t, at) for t, state, at in run.breaker
                   if state == "open" and t >= run.killed), None)
    closed_again = next((t for t, state, _ in run.breaker
                         if state == "closed" and t >= run.restarted), None)
    first_back = min((s.finished for s, m in ok
                      if m["provider"] == run.victim and s.scheduled >= run.restarted),
                     default=None)
    before = _share(ok, run, kill_s - 10, kill_s)
    recovered = _recovered(ok, run, back_s, 0.8 * before)
    attempts = [len(m.get("attempts") or ()) for _, m in ok]
    weights = ("default objective weights (cost, latency; quality unscored)"
               if args.weights == "default" else "latency weight only")
    lines = [
        f"## Router: a provider crashes under load (failover, circuit breaker), {weights}", "",
        f"Command: `{command}`: {args.rate:g} req/s open loop for {args.duration:g} s, "
        f"non-streaming, `model: \"auto\"` over {', '.join(ROUTES.values())} (one fake "
        f"upstream process per provider, TTFT {args.ttft_ms:g} ms, 16 tokens; tenant policy: "
        f"those three, {weights}), {args.routers} router processes. At "
        f"{kill_s:.1f} s the busiest provider's fake (**{run.victim}**) is SIGKILLed; at "
        f"{back_s:.1f} s it answers again (same port). Latency from each request's scheduled "
        "send time. Breakers at their defaults (open after 5 consecutive failures or 50 % of "
        "≥ 10 calls in 10 s; probe after 5 s).", "", machine(run.load_before), "",
        "| measure | value | target |", "| --- | ---: | --- |",
        f"| requests sent | {len(run.samples)} | |",
        f"| client-visible failures (non-200 or broken) | **{len(failed)}** | 0 |",
        "| kill → breaker open (Redis `opened_at`) | **"
        + (f"{opened[1] - run.killed_wall_ms:.0f} ms" if opened and opened[1] else "never")
        + "** | ≤ 1 s |",
        "| kill → breaker seen open by a 50 ms poll of `/v1/providers/stats` | "
        + (f"{(opened[0] - run.killed) * 1000:.0f} ms" if opened else "never") + " | |",
        f"| restart → first answer served by {run.victim} | "
        + (f"{first_back - run.restarted:.2f} s" if first_back else "never") + " | |",
        f"| restart → {run.victim}'s share of a 1 s window ≥ 80 % of its pre-kill share "
        f"({before:.0%}) | " + (f"{recovered:.2f} s" if recovered is not None else
                               f"not within the run ({args.duration - back_s:.0f} s)") + " | |",
        "| restart → breaker closed again (poll) | "
        + (f"{closed_again - run.restarted:.2f} s" if closed_again else "never") + " | |",
        f"| answers that failed over (> 1 attempt) | {sum(a > 1 for a in attempts)} | |",
        f"| extra attempts (attempts beyond the first) | {sum(attempts) - len(attempts)} | |",
        "", "Per phase (by scheduled send time):", "",
        "| phase | requests | failures | failovers | extra attempts | p50 ms | p99 ms | "
        "max ms | " + " | ".join(f"{p} share" for p in ROUTES) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in ROUTES) + " |"]
    phases = [("before the kill", 0.0, kill_s), (f"{run.victim} down", kill_s, back_s),
              (f"{run.victim} back", back_s, args.duration),
              ("first 2 s after the kill", kill_s, kill_s + 2)]
    for name, lo, hi in phases:
        lines.append(_phase_row(name, meta, run, lo, hi))
    lines += ["", "Victim's breaker as the poll saw it: " + ", ".join(
        f"{state} at {t - run.t0:.2f} s" for t, state, _ in run.breaker) + f" ({run.polls} "
        "polls).", ""]
    if failed:
        reasons = Counter(s.last.decode(errors="replace")[:120] for s in failed)
        lines += ["Failures: " + "; ".join(f"{n}× {r}" for r, n in reasons.most_common(5)), ""]
    return "\n".join(lines)


def _phase_row(name: str, meta: list[tuple[Sample, dict[str, Any] | None]], run: Run,
               lo: float, hi: float) -> str:
    rows = [(s, m) for s, m in meta if lo <= s.scheduled - run.t0 < hi]
    lat = [(s.finished - s.scheduled) * 1000 for s, m in rows if m is not None]
    attempts = [len(m.get("attempts") or ()) for _, m in rows if m is not None]
    served = Counter(m["provider"] for _, m in rows if m is not None)

    def p(q: float) -> str:
        return f"{np.percentile(lat, q):.1f}" if lat else "–"

    return (f"| {name} | {len(rows)} | {sum(m is None for _, m in rows)} | "
            f"{sum(a > 1 for a in attempts)} | {sum(attempts) - len(attempts)} | {p(50)} | "
            f"{p(99)} | {max(lat, default=float('nan')):.1f} | "
            + " | ".join(f"{served[pr] / max(len(lat), 1):.0%}" for pr in ROUTES) + " |")


def _share(ok: list[tuple[Sample, dict[str, Any]]], run: Run, lo: float, hi: float) -> float:
    window = [m["provider"] for s, m in ok if lo <= s.finished - run.t0 < hi]
    return window.count(run.victim) / len(window) if window else 0.0


def _recovered(ok: list[tuple[Sample, dict[str, Any]]], run: Run, since: float,
               target: float) -> float | None:
    """Seconds after `since` at which the victim's share of the last second first reaches
    `target` (windows ending every 100 ms)."""
    end = since + 1.0
    last = max((s.finished - run.t0 for s, _ in ok), default=0.0)
    while end <= last:
        if _share(ok, run, end - 1.0, end) >= target > 0:
            return end - since
        end += 0.1
    return None


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fault", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=100.0, help="requests per second")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of measured load")
    p.add_argument("--kill-at", type=float, default=20.0, help="seconds into the load")
    p.add_argument("--restart-at", type=float, default=40.0, help="seconds into the load")
    p.add_argument("--kill", choices=sorted(ROUTES), help="provider to kill (default: the "
                   "one that served most in the 5 s before the kill)")
    p.add_argument("--ttft-ms", type=float, default=20.0, help="the fakes' time to answer")
    p.add_argument("--routers", type=int, default=2, help="router processes")
    p.add_argument("--weights", choices=["default", "latency"], default="default",
                   help="the tenant's objective weights: the defaults, or latency alone")
    p.add_argument("--warmup", type=float, default=3.0, help="seconds, not recorded")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = p.parse_args(argv)
    if not 0 < args.kill_at < args.restart_at < args.duration:
        p.error("need 0 < --kill-at < --restart-at < --duration")
    return args


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(_parse()))
