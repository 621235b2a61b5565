"""The fault suite: on one stack, under open-loop load (half streamed, half not), each
scenario in turn — steady load, a fault of one of our own services or processes, its
recovery, more load — and then the billing ledger checked against what the clients saw.

    python -m bench.chaos [--rate 40] [--outage 4] [--quick] [--no-write]

Scenarios: SIGKILL then restart Redis, Kafka, PostgreSQL; SIGSTOP then SIGCONT each of them
(a pause); SIGKILL a router and the usage worker (the supervisor of `switchyard up`, run here
as it runs there, starts them again). `--quick` runs three scenarios with 2 s outages (the
test's form). Per scenario it records what the clients saw — answered, failed (by status and
error code), hung (no answer within the request's deadline), silently truncated (a stream
ended without `[DONE]` and without an error event) — and the time to recover; it asserts
that nothing hung or was truncated and that every answered request was billed exactly once.
Writes its section of bench/RESULTS.md (between its markers) and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiokafka import AIOKafkaConsumer

from bench.loadgen import (
    Sample,
    Served,
    machine,
    run_open_loop,
    single_upstream_gateway,
    write_section,
)
from compose.gateway import Gateway, RestartPolicy
from compose.stack import LocalStack
from topics import names

RESULTS = Path(__file__).with_name("RESULTS.md")
DEADLINE_MS = 15_000  # x-switchyard-timeout-ms of every request
CLIENT_TIMEOUT_S = DEADLINE_MS / 1000 + 3  # no answer by then: the request hung
RECOVERED_AFTER = 20  # consecutive successes that count as "recovered"
SERVICES = ("redis", "kafka", "postgres")
ALL = [f"kill-{s}" for s in SERVICES] + [f"pause-{s}" for s in SERVICES] \
    + ["kill-router", "kill-usage"]
# kill-router once left an answer unbilled when the kill fell between the answer and its
# usage event (bench/RESULTS.md, bench.chaos, issue 16); the answer now carries its bill.
QUICK = ["kill-redis", "kill-router", "kill-usage"]


@dataclass
class Scenario:
    name: str
    fault_at: float = 0.0  # perf_counter() of the fault
    back_at: float = 0.0  # the service answers again (restarted, resumed)
    samples: list[Sample] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)  # supervisor restarts meanwhile
    # filled in by the ledger check
    unbilled: list[str] = field(default_factory=list)  # answered 200, no ok row
    doubled: list[str] = field(default_factory=list)  # more than one ok row
    billed_failed: int = 0  # an ok row for a request whose client saw a failure
    no_event: list[str] = field(default_factory=list)  # answered 200, no ok event in the topic
    event_not_in_ledger: list[str] = field(default_factory=list)  # ok event, no ok row

    def outcomes(self) -> Counter[str]:
        return Counter(outcome(s) for s in self.samples)

    def recovery_s(self) -> float | None:
        """From the service's return to the answer of the first of RECOVERED_AFTER
        consecutive successes (by send time), counted from the first failure; None when no
        request failed (nothing to recover from)."""
        ordered = sorted(self.samples, key=lambda s: s.scheduled)
        first_failure = next((i for i, s in enumerate(ordered) if not s.ok), None)
        if first_failure is None:
            return None
        run = 0
        for i in range(first_failure, len(ordered)):
            run = run + 1 if ordered[i].ok else 0
            if run == RECOVERED_AFTER:
                return max(0.0, ordered[i - run + 1].finished - self.back_at)
        return float("inf")


def outcome(sample: Sample) -> str:
    """"ok", "hung", "truncated", "sse <code>" (an error event ended a stream), "<status>
    <code>" (an error answer), or "transport <what>" (the connection broke)."""
    if sample.ok:
        return "ok"
    if sample.status == 0 and sample.last.startswith((b"TimeoutError", b"ServerTimeoutError",
                                                      b"ConnectionTimeoutError")):
        return "hung"  # the client's timeout, above the request's deadline, ran out
    if sample.broken_stream is not None:
        code = _code(sample.broken_stream)
        return f"sse {code}" if code else "truncated"
    if sample.status == 0:
        return "transport " + sample.last.decode(errors="replace").split("(")[0]
    code = _code(sample.last) or "?"
    retry = "" if sample.status != 503 or sample.retry_after else " (no Retry-After!)"
    return f"{sample.status} {code}{retry}"


def _code(body: bytes) -> str | None:
    try:
        error = orjson.loads(body).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return str(error.get("code")) if isinstance(error, dict) else None


class Load:
    """Open-loop load in one-second slices, half streamed and half not, until stopped; every
    sample goes to the current scenario."""

    def __init__(self, session: aiohttp.ClientSession, served: Served, rate: float) -> None:
        self.session = session
        self.url = f"{served.url}/v1/chat/completions"
        self.headers = {"Authorization": f"Bearer {served.api_key}",
                        "Content-Type": "application/json",
                        "x-switchyard-timeout-ms": str(DEADLINE_MS)}
        self.rate = rate
        self.current: Scenario | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stop = asyncio.Event()
        self._runner: asyncio.Task[None] | None = None

    def _record(self, scenario: Scenario) -> Callable[[Sample], None]:
        return scenario.samples.append

    async def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            started = time.perf_counter()
            if self.current is not None:
                record = self._record(self.current)
                for stream in (False, True):
                    body: dict[str, Any] = {
                        "model": "gpt-4o-mini", "stream": stream,
                        "messages": [{"role": "user", "content": f"chaos {n} {stream}"}]}
                    if stream:
                        body["stream_options"] = {"include_usage": True}
                    self._tasks.append(asyncio.create_task(run_open_loop(
                        self.session, self.url, self.headers, body, rate=self.rate / 2,
                        duration_s=1, label="chaos", stream=stream, on_sample=record)))
                n += 1
            await asyncio.sleep(max(0.0, 1 - (time.perf_counter() - started)))

    def start(self) -> None:
        self._runner = asyncio.create_task(self._run())

    async def drain(self) -> None:
        """Wait for every request sent so far to end."""
        tasks, self._tasks = self._tasks, []
        await asyncio.gather(*tasks)

    async def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            await self._runner
        await self.drain()


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """`sig` to a service's whole process group (PostgreSQL's backends too)."""
    os.killpg(os.getpgid(pid), sig)


async def fault(name: str, stack: LocalStack, gateway: Gateway, outage_s: float,
                scenario: Scenario, log: Callable[[str], None]) -> None:
    """Inflict scenario `name`; returns once the victim is back (sets fault_at, back_at)."""
    kind, victim = name.split("-", 1)
    scenario.fault_at = time.perf_counter()
    if victim in SERVICES:
        if kind == "kill":
            await asyncio.to_thread(stack.kill, victim)
            await asyncio.sleep(outage_s)
            await asyncio.to_thread(stack.start_again, victim)
        else:
            pid = stack.pids()[victim]
            _signal_group(pid, signal.SIGSTOP)
            await asyncio.sleep(outage_s)
            _signal_group(pid, signal.SIGCONT)
        scenario.back_at = time.perf_counter()
    else:
        # SIGKILL one of our processes; the supervisor (running, as under `switchyard up`)
        # starts it again after its backoff.
        child = "router-0" if victim == "router" else "usage"
        before = gateway.restarts(child)
        os.kill(gateway.processes[child].pid, signal.SIGKILL)
        for _ in range(3000):  # the supervisor's first restart comes after 0.5 s
            if gateway.restarts(child) != before:
                break
            await asyncio.sleep(0.02)
        scenario.back_at = time.perf_counter()
    log(f"chaos: {name}: back after {scenario.back_at - scenario.fault_at:.1f} s")


def describe(scenario: Scenario, log: Callable[[str], None]) -> None:
    """When the failed, hung and truncated requests of a scenario were sent, relative to the
    fault, and what the clients saw; for the report and the logs."""
    by: dict[str, list[Sample]] = {}
    for s in scenario.samples:
        if not s.ok:
            by.setdefault(outcome(s), []).append(s)
    for what, samples in sorted(by.items()):
        sent = [s.scheduled - scenario.fault_at for s in samples]
        took = [s.finished - s.scheduled for s in samples]
        streamed = sum(s.ttft_ms is not None or s.broken_stream is not None for s in samples)
        log(f"chaos: {scenario.name}: {len(samples)} {what}: sent {min(sent):+.1f}..."
            f"{max(sent):+.1f} s from the fault (back at "
            f"{scenario.back_at - scenario.fault_at:+.1f} s), ended after {min(took):.1f}..."
            f"{max(took):.1f} s, {streamed} streams under way; e.g. "
            f"{samples[0].request_id or '(no id)'} {samples[0].last[:120]!r}")


async def run(args: argparse.Namespace, log: Callable[[str], None]) -> list[Scenario]:
    chosen = QUICK if args.quick else (args.only or ALL)
    scenarios = [Scenario(n) for n in chosen]
    async with single_upstream_gateway(log) as served:
        assert served.stack is not None
        assert served.gateway is not None
        stack, gateway = served.stack, served.gateway
        stopping = threading.Event()
        failed: list[BaseException] = []

        def supervise() -> None:
            try:
                gateway.supervise(stopping, RestartPolicy(), poll_s=0.1)
            except BaseException as exc:  # reported below
                failed.append(exc)

        supervisor = threading.Thread(target=supervise, name="chaos-supervisor", daemon=True)
        supervisor.start()
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT_S)
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                             timeout=timeout) as session:
                load = Load(session, served, args.rate)
                warmup = Scenario("warmup")
                load.current = warmup
                load.start()
                await asyncio.sleep(args.steady)
                for scenario in scenarios:
                    restarts = {n: gateway.restarts(n) for n in gateway.processes}
                    load.current = scenario
                    log(f"chaos: {scenario.name}: steady load")
                    await asyncio.sleep(args.steady)
                    await fault(scenario.name, stack, gateway, args.outage, scenario, log)
                    await asyncio.sleep(args.after)
                    scenario.restarts = {n: gateway.restarts(n) - restarts.get(n, 0)
                                         for n in gateway.processes
                                         if gateway.restarts(n) > restarts.get(n, 0)}
                    # The next scenario starts from a settled gateway: this one's requests
                    # all ended (load continues meanwhile, into a between-scenarios bucket).
                    load.current = Scenario("between")
                    await load.drain()
                    describe(scenario, log)
                await load.stop()
        finally:
            stopping.set()
            supervisor.join()
        if failed:
            raise failed[0]
        await reconcile(served, scenarios, log)
        for name in gateway.processes:
            if name.startswith("router") or name in ("ingress", "usage"):
                log(f"chaos: logs of {name}: {gateway.log_file(name)}")
    return scenarios


async def reconcile(served: Served, scenarios: list[Scenario],
                    log: Callable[[str], None]) -> None:
    """Wait for the ledger to settle (no new rows for a few seconds), then compare it with
    what the clients saw."""
    conn = await asyncpg.connect(served.settings.postgres.owner_dsn)
    try:
        last, stable_since, started = -1, time.monotonic(), time.monotonic()
        while time.monotonic() - stable_since < 5 and time.monotonic() - started < 90:
            count = await conn.fetchval("SELECT count(*) FROM usage_events")
            if count != last:
                last, stable_since = count, time.monotonic()
            await asyncio.sleep(0.5)
        rows = await conn.fetch("SELECT request_id, count(*) AS n FROM usage_events "
                                "WHERE status = 'ok' GROUP BY request_id")
        ok_ids = {r["request_id"] for r in rows}
        unbilled = [s.request_id for sc in scenarios for s in sc.samples
                    if s.ok and s.request_id not in ok_ids]
        for rid in unbilled[:5]:  # what the ledger has of them, for the report
            found = await conn.fetch("SELECT status, error_code, attempt, started_at "
                                     "FROM usage_events WHERE request_id = $1", rid)
            log(f"chaos: answered, no ok row: {rid}: {[dict(r) for r in found]}")
    finally:
        await conn.close()
    ok_rows = {r["request_id"]: r["n"] for r in rows}
    log(f"chaos: ledger settled: {last} rows, {len(ok_rows)} request ids with ok rows")
    topic = await ok_events(served)
    log(f"chaos: {names.USAGE}: {sum(topic.values())} ok events, {len(topic)} request ids")
    for scenario in scenarios:
        for s in scenario.samples:
            if s.ok and not topic.get(s.request_id):
                scenario.no_event.append(s.request_id)
            if topic.get(s.request_id) and not ok_rows.get(s.request_id):
                scenario.event_not_in_ledger.append(s.request_id)
    for scenario in scenarios:
        for s in scenario.samples:
            n = ok_rows.get(s.request_id, 0)
            if s.ok and n == 0:
                scenario.unbilled.append(s.request_id or "(no request id)")
            if n > 1:
                scenario.doubled.append(s.request_id)
            if not s.ok and n >= 1:
                scenario.billed_failed += 1


async def ok_events(served: Served) -> Counter[str]:
    """The `status = "ok"` usage events `llm.usage` holds now, by request id."""
    consumer = AIOKafkaConsumer(names.USAGE,
                                bootstrap_servers=served.settings.kafka.bootstrap_servers,
                                enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    found: Counter[str] = Counter()
    try:
        ends = await consumer.end_offsets(list(consumer.assignment()))
        async with asyncio.timeout(60):
            for tp, end in ends.items():
                while await consumer.position(tp) < end:
                    for record in (await consumer.getmany(tp, timeout_ms=200)).get(tp, []):
                        event = orjson.loads(record.value)
                        if event.get("status") == "ok":
                            found[event["request_id"]] += 1
    finally:
        await consumer.stop()
    return found


def failures(scenario: Scenario) -> list[str]:
    """The assertions a scenario broke."""
    out = scenario.outcomes()
    broken = []
    if out["hung"]:
        broken.append(f"{out['hung']} hung")
    if out["truncated"]:
        broken.append(f"{out['truncated']} silently truncated")
    if any("no Retry-After" in k for k in out):
        broken.append("503 without Retry-After")
    if scenario.unbilled:
        broken.append(f"{len(scenario.unbilled)} answered but not billed")
    if scenario.doubled:
        broken.append(f"{len(scenario.doubled)} billed twice")
    if scenario.event_not_in_ledger:
        broken.append(f"{len(scenario.event_not_in_ledger)} ok usage events not in the ledger")
    return broken


def render(scenarios: list[Scenario], args: argparse.Namespace, command: str,
           load_before: float) -> str:
    lines = [
        "## Fault suite (bench.chaos)", "",
        f"`{command}`: {args.rate:g} requests/s open loop (half streamed, half not; "
        f"`x-switchyard-timeout-ms: {DEADLINE_MS}`, client timeout {CLIENT_TIMEOUT_S:g} s), "
        f"one stack, the scenarios in turn: {args.steady:g} s steady, the fault "
        f"({args.outage:g} s for a service), {args.after:g} s after the victim is back. "
        f"Recovered: the answer of the first of {RECOVERED_AFTER} consecutive successes, "
        "from the victim's return. Ledger: after the run settles, `usage_events` rows with "
        "`status = 'ok'` by request id (`x-request-id`).", "",
        "| scenario | sent | answered | failed (status / code: count) | hung | truncated "
        "| recovered | unbilled | no ok event | ok event, no row | billed twice "
        "| ok row, client failed | restarted |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for sc in scenarios:
        out = sc.outcomes()
        failed = ", ".join(f"{k}: {v}" for k, v in sorted(out.items())
                           if k not in ("ok", "hung", "truncated")) or "none"
        rec = sc.recovery_s()
        recovered = "no failures" if rec is None else "never" if rec == float("inf") \
            else f"{rec:.1f} s"
        restarted = ", ".join(f"{k} ×{v}" for k, v in sorted(sc.restarts.items())) or "—"
        lines.append(
            f"| {sc.name} | {len(sc.samples)} | {out['ok']} | {failed} | {out['hung']} "
            f"| {out['truncated']} | {recovered} | {len(sc.unbilled)} | {len(sc.no_event)} "
            f"| {len(sc.event_not_in_ledger)} | {len(sc.doubled)} "
            f"| {sc.billed_failed} | {restarted} |")
    lines += ["", machine(load_before)]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr)  # noqa: E731
    load_before = os.getloadavg()[0]
    scenarios = await run(args, log)
    command = ("python -m bench.chaos " + " ".join(sys.argv[1:])).strip()
    section = render(scenarios, args, command, load_before)
    print(section)
    broken = {sc.name: f for sc in scenarios if (f := failures(sc))}
    for name, what in broken.items():
        print(f"FAILED {name}: {'; '.join(what)}", file=sys.stderr)
    if not args.no_write:
        write_section(RESULTS, "<!-- bench.chaos:start -->", "<!-- bench.chaos:end -->",
                      section)
    return 1 if broken else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=float, default=40, help="requests per second")
    parser.add_argument("--outage", type=float, default=4, help="seconds a service is down")
    parser.add_argument("--steady", type=float, default=4, help="seconds of load before")
    parser.add_argument("--after", type=float, default=8,
                        help="seconds of load after the victim is back")
    parser.add_argument("--quick", action="store_true",
                        help=f"only {', '.join(QUICK)}, 2 s outages, shorter phases")
    parser.add_argument("--only", action="append", choices=ALL, help="run just this scenario")
    parser.add_argument("--no-write", action="store_true", help="do not touch RESULTS.md")
    args = parser.parse_args(argv)
    if args.quick:
        args.outage, args.steady, args.after, args.no_write = 2, 2, 5, True
    return args


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(main_async(parse(argv)))


if __name__ == "__main__":
    sys.exit(main())
