"""Cutting the latency tail: three routes with the same heavy-tailed time to first token
(lognormal around a median, plus a share of calls that are many times slower), streamed
requests at a fixed rate, through one route, raced over 2 and 3 routes, and hedged at a TTFT
percentile. Each variant is its own tenant, so its billed attempts can be summed from the
usage ledger.

    python -m bench.tail [--rate 40] [--duration 30] [--variants single,hedged,spec2,spec3]

Smoke run: `--duration 5 --warmup 5 --no-write`. Writes its section of bench/RESULTS.md
(between its markers) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np

from bench.loadgen import (
    ROUTES,
    Result,
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
START, END = "<!-- bench.tail:start -->", "<!-- bench.tail:end -->"
SINGLE = ROUTES["mistral"]  # the cheapest: the route the bandit puts first in the others

# variant → (mode, the body's `switchyard` object, model)
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "single": ("fixed", {"mode": "fixed"}, SINGLE),
    "hedged": ("hedged p90, 2 routes", {"mode": "hedged", "routes": 2, "hedge_percentile": 90},
               "auto"),
    "spec2": ("speculative, 2 routes", {"mode": "speculative", "routes": 2}, "auto"),
    "spec3": ("speculative, 3 routes", {"mode": "speculative", "routes": 3}, "auto"),
}


@dataclass
class Variant:
    name: str
    result: Result
    samples: list[Sample] = field(default_factory=list)
    calls: int = 0  # provider calls, from the fakes' counters
    disconnects: int = 0  # calls abandoned mid-way (lost races), from the fakes' counters
    ledger: dict[str, int] = field(default_factory=dict)
    # Per request, first attempt's start → the winner's first token, as the router timed it
    # (usage ledger): the routing effect without the ingress, Kafka and classifier queueing.
    router_ttfts_ms: list[float] = field(default_factory=list)


async def main(args: argparse.Namespace) -> None:
    log = lambda line: print(line, file=sys.stderr)  # noqa: E731
    load_before = os.getloadavg()[0]
    flags = ["--ttft-ms", str(args.ttft_ms), "--ttft-sigma", str(args.ttft_sigma),
             "--slow-rate", str(args.slow_rate), "--slow-factor", str(args.slow_factor),
             "--tokens", str(args.tokens), "--inter-token-ms", str(args.inter_token_ms)]
    with LocalStack.ephemeral(log=log) as stack, \
            RoutedGateway(stack, flags, routers=args.routers, log=log) as bench:
        done = await _measure(args, bench)
    command = ("python -m bench.tail " + " ".join(sys.argv[1:])).strip()
    section = render(done, args, command, load_before)
    print(section)
    if not args.no_write:
        write_section(RESULTS, START, END, section)


async def _measure(args: argparse.Namespace, bench: RoutedGateway) -> list[Variant]:
    url = f"{bench.url}/v1/chat/completions"
    done = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        # Warm-up, not recorded: pools, posteriors, and each router's TTFT observations
        # (hedging waits 1 s until a route has 20), through the route hedging starts on.
        key = await bench.tenant("tail-warmup", routing_policy())
        await run_open_loop(session, url, _headers(key), _body("hedged"), rate=args.rate,
                            duration_s=args.warmup, label="warmup", stream=True)
        for name in args.variants:
            key = await bench.tenant(f"tail-{name}", routing_policy())
            before = await _fake_stats(session, bench)
            variant = Variant(name, Result(name, args.rate, args.duration))
            variant.result = await run_open_loop(
                session, url, _headers(key), _body(name), rate=args.rate,
                duration_s=args.duration, label=name, stream=True,
                on_sample=variant.samples.append)
            after = await _fake_stats(session, bench)
            variant.calls = after[0] - before[0]
            variant.disconnects = after[1] - before[1]
            variant.ledger, variant.router_ttfts_ms = await _ledger(
                bench, f"tail-{name}", variant.calls)
            print(f"tail: {name} done", file=sys.stderr)
            done.append(variant)
    return done


def _headers(api_key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
            "x-switchyard-category": "question_answering"}


def _body(variant: str) -> dict[str, Any]:
    _, extension, model = VARIANTS[variant]
    return {"model": model, "stream": True, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "tail hello there"}],
            "switchyard": extension}


async def _fake_stats(session: aiohttp.ClientSession, bench: RoutedGateway) -> tuple[int, int]:
    calls = disconnects = 0
    for provider in ROUTES:
        async with session.get(f"{bench.fake_url(provider)}/_fake/stats") as resp:
            stats = await resp.json()
        calls += stats["requests_total"]
        disconnects += stats["disconnects"]
    return calls, disconnects


async def _ledger(bench: RoutedGateway, tenant: str,
                  calls: int) -> tuple[dict[str, int], list[float]]:
    """The tenant's billed attempts and tokens (usage_events), once the usage worker has
    recorded every provider call (or 15 s passed), and each request's router-side TTFT."""
    conn = await asyncpg.connect(bench.stack.settings.postgres.owner_dsn)
    try:
        row: asyncpg.Record | None = None
        for _ in range(150):
            row = await conn.fetchrow(
                "SELECT count(*) AS attempts,"
                " count(*) FILTER (WHERE u.status = 'ok') AS answered,"
                " coalesce(sum(u.prompt_tokens + u.completion_tokens), 0) AS tokens,"
                " coalesce(sum(u.prompt_tokens + u.completion_tokens)"
                "   FILTER (WHERE u.status = 'ok'), 0) AS answer_tokens,"
                " coalesce(sum(u.completion_tokens) FILTER (WHERE u.status <> 'ok'), 0)"
                "   AS extra_completion_tokens"
                " FROM usage_events u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1",
                tenant)
            if row is not None and row["attempts"] >= calls:
                break
            await asyncio.sleep(0.1)
        ttfts = await conn.fetch(
            "SELECT min(extract(epoch FROM u.started_at) * 1000 + u.ttft_ms)"
            "   FILTER (WHERE u.status = 'ok') - min(extract(epoch FROM u.started_at) * 1000)"
            "   AS ttft"
            " FROM usage_events u JOIN tenants t ON t.id = u.tenant_id WHERE t.name = $1"
            " GROUP BY u.request_id", tenant)
        return ({} if row is None else {k: int(v) for k, v in row.items()},
                [float(r["ttft"]) for r in ttfts if r["ttft"] is not None])
    finally:
        await conn.close()


def render(done: list[Variant], args: argparse.Namespace, command: str,
           load_before: float) -> str:
    lines = [
        "## Router: cutting the TTFT tail (speculative racing, hedging)", "",
        f"Command: `{command}`: per variant {args.rate:g} streamed req/s open loop for "
        f"{args.duration:g} s after a {args.warmup:g} s hedged warm-up; TTFT from each "
        "request's scheduled send time to its first content chunk. Routes: "
        f"{', '.join(ROUTES.values())}, one fake upstream process each (own seed), every call "
        f"waiting {args.ttft_ms:g} ms × exp(N(0, {args.ttft_sigma:g})) before its first token, "
        f"× {args.slow_factor:g} for a random {args.slow_rate:.0%} of calls; then "
        f"{args.tokens} tokens {args.inter_token_ms:g} ms apart. Single route: `{SINGLE}`, "
        "mode fixed (the route the bandit ranks first for the others: the cheapest). "
        f"{args.routers} router process(es). Calls per request from the fakes' counters; "
        "tokens from the usage ledger (what is billed, estimated for abandoned attempts); "
        "router-side TTFT from the ledger too: first attempt's start to the winning attempt's "
        "first token, per request (no ingress, Kafka or classifier time).",
        "", machine(load_before), "",
        "| variant | mode | requests | errors | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | "
        "total p50 ms | total p99 ms | router-side TTFT p50 / p99 ms | provider calls / "
        "request | answered by a later route | extra tokens / request |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |"]
    for v in done:
        r = v.result
        metas = [m for s in v.samples if (m := metadata(s)) is not None]
        later = sum(1 for m in metas if m.get("attempts")
                    and _winner(m) > 1) / max(len(metas), 1)
        extra = (v.ledger.get("tokens", 0) - v.ledger.get("answer_tokens", 0)) / max(r.sent, 1)
        lines.append(
            f"| {v.name} | {VARIANTS[v.name][0]} | {r.sent} | {r.errors} | "
            f"{r.pct(50, True):.1f} | {r.pct(95, True):.1f} | {r.pct(99, True):.1f} | "
            f"{r.pct(50):.1f} | {r.pct(99):.1f} | {_pct(v.router_ttfts_ms, 50):.1f} / "
            f"{_pct(v.router_ttfts_ms, 99):.1f} | {v.calls / max(r.sent, 1):.3f} | "
            f"{later:.1%} | {extra:.1f} |")
    base = next((v for v in done if v.name == "single"), None)
    if base is not None:
        lines += ["", "Against the single route:", "",
                  "| variant | TTFT p99 | TTFT p95 | router-side TTFT p99 | extra provider calls "
                  "| target (hedged) |", "| --- | ---: | ---: | ---: | ---: | --- |"]
        for v in done:
            if v is base:
                continue
            p99 = v.result.pct(99, True) / base.result.pct(99, True) - 1
            p95 = v.result.pct(95, True) / base.result.pct(95, True) - 1
            router = _pct(v.router_ttfts_ms, 99) / _pct(base.router_ttfts_ms, 99) - 1
            calls = (v.calls / max(v.result.sent, 1)) / (base.calls / max(base.result.sent, 1)) - 1
            target = ""
            if v.name == "hedged":
                met = p99 <= -0.5 and calls <= 0.15
                target = (f"p99 −50 % or better with ≤ +15 % calls: "
                          f"**{'met' if met else 'missed'}**")
            lines.append(f"| {v.name} | {p99:+.0%} | {p95:+.0%} | {router:+.0%} | "
                         f"{calls:+.1%} | {target} |")
    errors = [e for v in done for e in v.result.error_samples]
    if errors:
        lines += ["", "Errors (samples): " + "; ".join(errors[:5])]
    return "\n".join(lines)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def _winner(meta: dict[str, Any]) -> int:
    """The attempt number that answered (metadata names the winner's model)."""
    for attempt in meta.get("attempts") or ():
        if attempt.get("status") == "ok" and attempt.get("model") == meta.get("model"):
            return int(attempt.get("attempt", 1))
    return 1


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tail", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rate", type=float, default=40.0, help="streamed requests per second")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per variant")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds, hedged, not recorded")
    p.add_argument("--variants", default="single,hedged,spec2,spec3",
                   type=lambda s: [v for v in s.split(",") if v],
                   help=f"comma-separated, in order, of: {', '.join(VARIANTS)}")
    p.add_argument("--ttft-ms", type=float, default=40.0, help="median time to first token")
    p.add_argument("--ttft-sigma", type=float, default=0.25, help="lognormal sigma")
    p.add_argument("--slow-rate", type=float, default=0.05, help="share of slow calls")
    p.add_argument("--slow-factor", type=float, default=10.0, help="how much slower")
    p.add_argument("--tokens", type=int, default=20)
    p.add_argument("--inter-token-ms", type=float, default=2.0)
    p.add_argument("--routers", type=int, default=1, help="router processes")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants: {', '.join(unknown)}")
    return args


if __name__ == "__main__":
    import uvloop

    uvloop.run(main(_parse()))
