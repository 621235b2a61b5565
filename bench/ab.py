"""Quick A/B of one change: Switchyard against the fake upstream directly, at one rate, after a
long warm-up at that rate (the Kafka broker's JIT takes tens of seconds to settle), alternated
for a few rounds. Prints added p50/p99 (and TTFT when streaming) and CPU-ms per request per
process; writes nothing. For the recorded figures use `make bench`.

`--route messages` measures Anthropic's `/v1/messages` (`ingress/messages.py`) next to chat
completions: each round runs the same answer three ways (the fake directly, the gateway's
chat completions, the gateway's messages) and also prints what messages adds over chat
completions, the translation's cost both ways (the route is the fake's OpenAI dialect).
`--route responses` does the same for OpenAI's `/v1/responses` (`ingress/responses.py`),
each response stored as by default (`store: true`: one Redis write per request).

    python -m bench.ab RATE [--phase-s 20] [--rounds 2] [--warmup-s 30] [--stream] [--session]
        [--limits on|off] [--route chat|messages|responses] [--tracing off|on] [--cache off|hit]
        [--prompts fixed|dev] [--classifier cascade|linear]

`--tracing on`: every process traces every request (`OTEL_TRACES_SAMPLER=always_on`) and
exports it over OTLP/HTTP to a local sink that accepts and discards (`compose/otlp_sink.py`,
a process of its own); `off` (the default) is the gateway's default, tracing off.

`--cache hit`: every chat completion is the same `temperature: 0` request with
`x-switchyard-cache: on`, stored once before the warm-up, so each is a response-cache hit
answered by the ingress (docs/cache.md); `off` (the default) does not use the cache.

`--prompts dev --classifier cascade|linear`: the dev split's prompts in turn, with the
classifier as it ships (the encoder asked on the prompts the linear model is unsure of) or
the linear model alone: what the cascade adds to the router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import httpx

from bench.loadgen import box_busy_s, cpu_seconds, run_open_loop, single_upstream_gateway
from compose.stack import free_port
from workers.classifier.evaluate import load_jsonl

DEV = Path(__file__).resolve().parents[1] / "data/prompt-categories/dev.jsonl"
# Processes that serve every target alike: shown, but not the gateway's cost.
_HARNESS = frozenset(("fake-upstream", "load-generator"))


async def main(args: argparse.Namespace) -> None:
    with _otlp_sink(args.tracing == "on") as env:
        if args.classifier == "linear":  # the encoder unset: no cascade
            env = {**env, "SWITCHYARD_CLASSIFIER__ENCODER_PATH": ""}
        async with single_upstream_gateway(lambda line: None, limits=args.limits == "on",
                                           env=env) as served:
            await _run(args, served.url, served.fake_url, served.api_key, served.pids)


@contextlib.contextmanager
def _otlp_sink(on: bool) -> Iterator[dict[str, str]]:
    """The gateway's tracing environment: none (off), or 100 % sampling exported to a sink
    process that discards what it receives."""
    if not on:
        yield {"OTEL_TRACES_EXPORTER": "none"}
        return
    port = free_port()
    sink = subprocess.Popen([sys.executable, "-m", "compose.otlp_sink", "--port", str(port)])
    try:
        yield {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": "always_on",
               "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}"}
    finally:
        sink.terminate()
        sink.wait(timeout=10)


async def _run(args: argparse.Namespace, gateway_url: str, fake_url: str, key: str,
               pids: dict[str, int]) -> None:
    async with httpx.AsyncClient() as admin:
        await admin.put(f"{fake_url}/_fake/config", json={
            "tokens": 100 if args.stream else 16, "inter_token_ms": 1 if args.stream else 0})
        if args.session:  # the bearer is a session token instead of the API key
            login = await admin.post(f"{gateway_url}/v1/auth/login", json={"api_key": key})
            login.raise_for_status()
            key = login.json()["token"]
    body: dict[str, object] = {
        "model": "gpt-4o-mini", "stream": args.stream,
        "messages": [{"role": "user", "content": "bench hello there"}]}
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    if args.cache == "hit":  # every request the same reproducible one, answered from Redis
        body["temperature"] = 0
        headers["x-switchyard-cache"] = "on"
    bodies: list[dict[str, object]] = [body]
    if args.prompts == "dev":  # each request a dev prompt in turn, as the classifier meets them
        bodies = [{**body, "messages": [{"role": "user", "content": text}]}
                  for text in load_jsonl(DEV)[0]]
    gateway = (f"{gateway_url}/v1/chat/completions", headers)
    # The same request in the other ingresses' shapes, with their key headers, as their SDKs
    # send them: Anthropic's Messages, OpenAI's Responses.
    other = {
        "messages": (f"{gateway_url}/v1/messages",
                     {"x-api-key": key, "anthropic-version": "2023-06-01",
                      "Content-Type": "application/json"},
                     {**body, "max_tokens": 1024}),
        "responses": (f"{gateway_url}/v1/responses",
                      {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
                      {"model": body["model"], "stream": args.stream,
                       "input": "bench hello there"}),
    }.get(args.route)
    direct = (f"{fake_url}/v1/chat/completions", {"Content-Type": "application/json"})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        if args.cache == "hit":  # the one miss that stores the entry
            async with session.post(gateway[0], json=body, headers=headers) as primed:
                await primed.read()
                if primed.headers.get("x-switchyard-cache") not in ("miss", "hit"):
                    raise RuntimeError(f"the cache did not take the request: {primed.status}")
        await run_open_loop(session, *gateway, bodies, rate=args.rate,
                            duration_s=args.warmup_s, label="warmup", stream=args.stream)
        if other is not None:
            await run_open_loop(session, *other, rate=args.rate,
                                duration_s=min(args.warmup_s, 10), label="warmup",
                                stream=args.stream)
        for n in range(args.rounds):
            base = await run_open_loop(session, *direct, bodies, rate=args.rate,
                                       duration_s=args.phase_s, label="direct",
                                       stream=args.stream)
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            before_box_s, before_own_s, t0 = box_busy_s(), time.process_time(), time.monotonic()
            ours = await run_open_loop(session, *gateway, bodies, rate=args.rate,
                                       duration_s=args.phase_s, label="switchyard",
                                       stream=args.stream)
            cpu_ms = {name: 1000 * (cpu_seconds(pid) - before[name]) / max(ours.sent, 1)
                      for name, pid in pids.items()}
            own_s = time.process_time() - before_own_s
            cpu_ms["load-generator"] = 1000 * own_s / max(ours.sent, 1)
            total = sum(v for name, v in cpu_ms.items() if name not in _HARNESS)
            box_cores = (box_busy_s() - before_box_s) / (time.monotonic() - t0)
            line = (f"round {n}: added p50 {ours.pct(50) - base.pct(50):+.2f} ms, "
                    f"p99 {ours.pct(99) - base.pct(99):+.2f} ms, errors {ours.errors}")
            if args.stream:
                line += (f", TTFT p50 {ours.pct(50, True) - base.pct(50, True):+.2f} ms, "
                         f"p99 {ours.pct(99, True) - base.pct(99, True):+.2f} ms")
            shares = ", ".join(f"{name} {v:.2f}" for name, v in
                               sorted(cpu_ms.items(), key=lambda item: -item[1]))
            print(f"{line} | CPU-ms per request {total:.2f} ({shares}) | box busy "
                  f"{box_cores:.2f} cores", flush=True)
            if other is not None:
                theirs = await run_open_loop(session, *other, rate=args.rate,
                                             duration_s=args.phase_s, label=args.route,
                                             stream=args.stream)
                line = (f"round {n}: /v1/{args.route} added p50 "
                        f"{theirs.pct(50) - base.pct(50):+.2f} ms, "
                        f"p99 {theirs.pct(99) - base.pct(99):+.2f} ms "
                        f"(over chat completions p50 {theirs.pct(50) - ours.pct(50):+.2f} ms, "
                        f"p99 {theirs.pct(99) - ours.pct(99):+.2f} ms), "
                        f"errors {theirs.errors}")
                if args.stream:
                    line += (f", TTFT p50 {theirs.pct(50, True) - base.pct(50, True):+.2f} "
                             f"ms (over chat completions "
                             f"{theirs.pct(50, True) - ours.pct(50, True):+.2f} ms)")
                print(line, flush=True)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rate", type=float, help="requests per second, open loop")
    p.add_argument("--phase-s", type=float, default=20.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup-s", type=float, default=30.0)
    p.add_argument("--stream", action="store_true", help="100-token answers, 1 ms per token")
    p.add_argument("--limits", choices=("on", "off"), default="on",
                   help="rate limits and a spend budget checked at admission (high enough "
                   "never to refuse) or rate limits off (`limits.enabled`) and no budget: the "
                   "A/B of admission's cost")
    p.add_argument("--tracing", choices=("off", "on"), default="off",
                   help="tracing off (the default), or every request traced by every process "
                   "and exported to a local OTLP sink that discards it: the A/B of tracing's "
                   "cost")
    p.add_argument("--cache", choices=("off", "hit"), default="off",
                   help="off: requests that do not use the response cache (the plain path); "
                   "hit: `temperature: 0` with `x-switchyard-cache: on`, stored once before "
                   "the warm-up, so every measured request is a hit answered by the ingress "
                   "(docs/cache.md): the cost of the lookup against the full trip")
    p.add_argument("--session", action="store_true",
                   help="authenticate with a session token (POST /v1/auth/login) instead of "
                   "the API key")
    p.add_argument("--prompts", choices=("fixed", "dev"), default="fixed",
                   help="fixed: one short prompt (the linear model is sure of it); dev: the "
                   "dev split's prompts in turn, so the classifier's encoder is asked as "
                   "often as in real traffic (about one prompt in ten)")
    p.add_argument("--classifier", choices=("cascade", "linear"), default="cascade",
                   help="cascade: the classifier as it ships; linear: the linear model alone "
                   "(`SWITCHYARD_CLASSIFIER__ENCODER_PATH` empty): the A/B of the encoder")
    p.add_argument("--route", choices=("chat", "messages", "responses"), default="chat",
                   help="messages: also Anthropic's /v1/messages each round, beside chat "
                   "completions; responses: also OpenAI's /v1/responses")
    return p.parse_args()


if __name__ == "__main__":
    asyncio.run(main(parse()))
