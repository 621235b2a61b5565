"""An open-loop load generator: requests leave on a fixed schedule whatever the server does,
and each latency is measured from its *scheduled* send time, so queueing is never hidden
(no coordinated omission)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import numpy as np
import orjson
from pydantic import SecretStr

from compose.children import Children, wait_http
from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from state.budgets import put_budget
from state.keys import create_key
from state.limits import lift_limits, write_limits
from state.tenancy import platform_scope
from topics.budgets import MAX_BUDGET_USD, Budget
from topics.catalog import load_catalog
from topics.limits import POLICY_FIELDS
from topics.sessions import SigningKeys
from topics.settings import AuthSettings, RouterSettings, Settings
from workers.providers.base import SseParser


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


@dataclass(frozen=True, slots=True)
class Sample:
    """One request's outcome, for benchmarks that look past latency (e.g. at the routing
    metadata of each answer)."""

    scheduled: float  # perf_counter() at which the request was due to leave
    finished: float  # perf_counter() at which its answer (or failure) was complete
    status: int  # HTTP status; 0 when the transport failed or the stream broke
    ttft_ms: float | None  # streamed: scheduled send → first content chunk
    # Non-streamed: the body. Streamed: the data of the last event before [DONE] (the usage
    # chunk, with the metadata, when `stream_options.include_usage` is set). Failures: the
    # reason.
    last: bytes
    request_id: str = ""  # the answer's x-request-id header ("" when no answer came)
    retry_after: str | None = None  # the answer's Retry-After header
    # A stream that began (200) and then ended without [DONE]: the data of its last event
    # (an error body when the gateway ended it with an SSE error event); else None.
    broken_stream: bytes | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200


OnSample = Callable[[Sample], None]


async def run_open_loop(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
                        body: dict[str, Any] | Sequence[dict[str, Any]], *, rate: float,
                        duration_s: float, label: str, stream: bool = False,
                        on_sample: OnSample | None = None) -> Result:
    """Send `rate * duration_s` requests at fixed intervals (`body`, or each of a list of
    bodies in turn); `on_sample`, if given, sees each request's outcome as it completes."""
    result = Result(label=label, rate=rate, duration_s=duration_s)
    payloads = [orjson.dumps(b) for b in ([body] if isinstance(body, dict) else body)]
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
            _one(session, url, headers, payloads[i % len(payloads)], scheduled, stream,
                 result, on_sample)))
    await asyncio.gather(*tasks)
    return result


async def _one(session: aiohttp.ClientSession, url: str, headers: dict[str, str],
               payload: bytes, scheduled: float, stream: bool, result: Result,
               on_sample: OnSample | None = None) -> None:
    ttft = None
    events: StreamEvents | None = None
    request_id, retry_after = "", None
    try:
        async with session.post(url, data=payload, headers=headers) as resp:
            request_id = resp.headers.get("x-request-id", "")
            retry_after = resp.headers.get("retry-after")
            if resp.status != 200:
                text = await resp.read()
                result.errors += 1
                if len(result.error_samples) < 5:
                    reason = text.decode(errors="replace")[:200]
                    result.error_samples.append(f"{resp.status} {reason}")
                if on_sample is not None:
                    on_sample(Sample(scheduled, time.perf_counter(), resp.status, None, text,
                                     request_id, retry_after))
                return
            if stream:
                events = StreamEvents(scheduled)
                async for raw in resp.content.iter_any():
                    if events.feed(raw):
                        break
                else:
                    raise RuntimeError("stream ended without [DONE]")
                ttft, last = events.ttft_ms, events.last
                if ttft is not None:
                    result.ttfts_ms.append(ttft)
            else:
                last = await resp.read()
        finished = time.perf_counter()
        result.latencies_ms.append((finished - scheduled) * 1000)
        if on_sample is not None:
            on_sample(Sample(scheduled, finished, 200, ttft, last, request_id))
    except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
        ttft = events.ttft_ms if events is not None else None
        result.errors += 1
        if len(result.error_samples) < 5:
            result.error_samples.append(repr(exc)[:200])
        if on_sample is not None:
            broken = events.last if events is not None else None
            on_sample(Sample(scheduled, time.perf_counter(), 0, ttft, repr(exc).encode(),
                             request_id, retry_after, broken))


# The data that ends the other ingresses' streams, and that starts a Responses text delta.
_ENDS = (b'{"type":"message_stop"', b'{"type":"response.completed"')
_FIRST_TEXT = b'{"type":"response.output_text.delta"'


class StreamEvents:
    """What the load generator needs of an SSE answer, read a network read at a time (a line
    at a time cost the shared box more CPU than some of the processes it measures): when the
    first content arrived, the last data event before [DONE], and whether [DONE] came (for
    Anthropic's streams, `bench.ab --route messages`, their text_delta and message_stop; for
    OpenAI's Responses streams, `--route responses`, output_text.delta and the terminal
    response.completed)."""

    def __init__(self, scheduled: float) -> None:
        self._scheduled = scheduled
        self._parser = SseParser()
        self.ttft_ms: float | None = None
        self.last = b""

    def feed(self, raw: bytes) -> bool:
        """Take one read; True once [DONE] (Anthropic's streams: message_stop; Responses
        streams: response.completed) has arrived."""
        for event in self._parser.feed(raw):
            if event.data == b"[DONE]" or event.data.startswith(_ENDS):
                return True
            if self.ttft_ms is None and ((b'"content":"' in event.data
                                         and b'"content":""' not in event.data)
                                         or event.data.startswith(_FIRST_TEXT)
                                         or b'"type":"text_delta"' in event.data):
                self.ttft_ms = (time.perf_counter() - self._scheduled) * 1000
            self.last = event.data
        return False


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants so far (Linux /proc):
    PostgreSQL's work happens in backends that are children of the postmaster."""
    ticks = 0
    for proc in process_tree(pid):
        try:
            ticks += stat_ticks(f"/proc/{proc}/stat")[1]
        except FileNotFoundError:
            continue  # exited meanwhile
    return ticks / os.sysconf("SC_CLK_TCK")


def stat_ticks(path: str) -> tuple[str, int]:
    """A process's or thread's name and user + system clock ticks, from its /proc stat file."""
    with open(path) as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2:].split()
    return stat[stat.index("(") + 1:stat.rindex(")")], int(fields[11]) + int(fields[12])


def box_busy_s() -> float:
    """CPU-seconds the whole box has been busy (all cores, every process), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (Linux /proc)."""
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


def machine(load_before: float | None = None) -> str:
    """One line naming the machine and the services' versions, for a results section;
    `load_before`: the 1-minute load average before the benchmark started anything."""
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    redis = _version(["redis-server", "--version"]).split(" sha=")[0].replace(
        "Redis server v=", "Redis ")
    postgres = _version(["psql", "--version"]).split()[2]
    return (f"Machine: {cpu}, {len(os.sched_getaffinity(0))} cores, Python "
            f"{platform.python_version()}, Kafka 3.9.1 (KRaft), {redis}, PostgreSQL {postgres}; "
            f"everything on one box; run {time.strftime('%Y-%m-%d %H:%M %Z')}"
            + ("." if load_before is None else f"; 1-min load average {load_before:.2f} before "
               "the run started (other work on the box)."))


def _version(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout.strip()


def write_section(path: Path, start: str, end: str, body: str) -> None:
    """Replace the text between the `start` and `end` markers of `path` with `body` (the
    markers kept), or append the marked section when the markers are not there yet."""
    section = f"{start}\n{body.strip()}\n{end}"
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    path.write_text(text)


# --- Switchyard on the real stack, routing among providers that each have their own fake ---

# Three cheap "fast"-class models of three providers, all OpenAI dialect.
ROUTES: dict[str, str] = {"deepseek": "deepseek-chat", "mistral": "mistral-small-latest",
                          "xai": "grok-4-1-fast"}


def routing_policy(*, latency_only: bool = False) -> dict[str, Any]:
    """A tenant routing policy admitting only ROUTES, with the default objective weights (the
    cheapest route then takes nearly all traffic), or scored on latency alone (every answer of
    a healthy fake then has the same reward, 1)."""
    policy: dict[str, Any] = {"allowed_models": list(ROUTES.values())}
    if latency_only:
        policy["weights"] = {"cost": 0, "latency": 1, "quality": 0}
    return policy


class RoutedGateway(Children):
    """The gateway's processes plus one fake upstream process per provider of ROUTES (its own
    port, so one provider can be killed and restarted), each started with `fake_flags` and its
    own `--seed` (the i-th provider's is i: their random draws are independent, not in
    lockstep). `with RoutedGateway(stack, ...):`."""

    def __init__(self, stack: LocalStack, fake_flags: list[str], *, routers: int = 1,
                 log: Callable[[str], None] = print) -> None:
        self.stack = stack
        self.fake_flags = fake_flags
        self.ports = {provider: free_port() for provider in ROUTES}
        catalog = load_catalog(stack.settings.catalog_path)
        settings = stack.settings.model_copy(update={
            "ingress": stack.settings.ingress.model_copy(update={"port": free_port()}),
            "provider_base_urls": {p: f"{self.fake_url(p)}/v1" for p in ROUTES}})
        keys = {catalog.providers[p].api_key_env: f"env-key-{p}" for p in ROUTES}
        self.logs = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
        self.gateway = Gateway(settings, self.logs, routers=routers, extra_env=keys, log=log)

    def fake_url(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.ports[provider]}"

    @property
    def url(self) -> str:
        return self.gateway.url

    def start_fake(self, provider: str) -> None:
        """Start (or restart, on the same port) the provider's fake; blocks until it answers."""
        self.gateway.spawn(f"fake-{provider}", "fake-upstream", "--host", "127.0.0.1",
                           "--port", str(self.ports[provider]), *self.fake_flags,
                           "--seed", str(list(ROUTES).index(provider)))
        name = f"fake-{provider}"
        wait_http(f"{self.fake_url(provider)}/_fake/stats", 20,
                  self.gateway.log_file(name), self.gateway.processes[name], poll_s=0.01)

    def kill_fake(self, provider: str) -> None:
        """SIGKILL the provider's fake, like a crash."""
        self.gateway.kill(f"fake-{provider}")

    def pids(self) -> dict[str, int]:
        return {name: p.pid for name, p in self.gateway.processes.items()} | self.stack.pids()

    async def tenant(self, name: str, policy: dict[str, Any] | None = None) -> str:
        """A new API key of tenant `name`, whose routing policy is then set to `policy`."""
        conn = await asyncpg.connect(self.stack.settings.postgres.owner_dsn)
        try:
            _, api_key = await create_key(conn, name)
        finally:
            await conn.close()
        if policy is not None:
            async with aiohttp.ClientSession() as http, http.put(
                    f"{self.url}/v1/routing/policy", json=policy,
                    headers={"Authorization": f"Bearer {api_key}"}) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"routing policy refused: {await resp.text()}")
        return api_key

    def start(self) -> None:
        self.logs.mkdir(parents=True, exist_ok=True)
        for provider in ROUTES:
            self.start_fake(provider)
        self.gateway.start()

    def stop(self) -> None:
        self.gateway.stop()


@dataclass(frozen=True, slots=True)
class Served:
    """A gateway whose every route is one fake upstream, and what a benchmark needs of it."""

    url: str
    fake_url: str
    api_key: str
    pids: dict[str, int]  # our processes and the stack's services, by name
    settings: Settings  # the gateway's
    stack: LocalStack | None = None  # for fault benchmarks: its services
    gateway: Gateway | None = None  # for fault benchmarks: our processes


@contextlib.asynccontextmanager
async def single_upstream_gateway(log: Callable[[str], None],
                                  router: RouterSettings | None = None,
                                  limits: bool = True,
                                  env: dict[str, str] | None = None) -> AsyncIterator[Served]:
    """A fresh stack and gateway, the fake upstream as the offline fallback for every model,
    and an API key; all stopped on exit. `router`: the routers' settings, if not the
    defaults. `limits`: rate limits and a spend budget checked on every request (all far above
    what a run uses, so that admission costs what it costs and refuses nothing), or rate
    limits not checked at all and no budget. `env`: more environment for every process of the
    gateway (e.g. the `OTEL_*` variables of `bench.ab --tracing on`)."""
    with LocalStack.ephemeral(log=log) as stack:
        fake_port = free_port()
        settings = stack.settings.model_copy(update={
            "ingress": stack.settings.ingress.model_copy(update={"port": free_port()}),
            "router": router or stack.settings.router,
            "limits": stack.settings.limits.model_copy(update={"enabled": limits}),
            "fallback_upstream_url": f"http://127.0.0.1:{fake_port}/v1",
            # Sessions work too (`bench.ab --session` measures a JWT bearer).
            "auth": AuthSettings(signing_keys=SecretStr(SigningKeys.generate("s1")),
                                 active_signing_key="s1")})
        conn = await asyncpg.connect(settings.postgres.owner_dsn)
        try:
            key_id, api_key = await create_key(conn, "bench")
            async with platform_scope(conn) as scoped:
                tenant_id = await scoped.fetchval(
                    "SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
            await lift_limits(conn, tenant_id)
        finally:
            await conn.close()
        if limits:
            await _admission_never_refusing(settings, tenant_id)
        logs = Path(tempfile.mkdtemp(prefix="switchyard-bench-"))
        with Gateway(settings, logs, fake_upstream_port=fake_port, log=log,
                     extra_env=env) as gateway:
            yield Served(gateway.url, f"http://127.0.0.1:{fake_port}", api_key,
                         {name: p.pid for name, p in gateway.processes.items()}
                         | stack.pids(), settings, stack, gateway)


async def _admission_never_refusing(settings: Settings, tenant_id: str) -> None:
    """Every rate limit and a hard monthly budget, all far above what a run uses: admission
    runs both scripts on every request (its whole cost) and refuses nothing."""
    pool = await asyncpg.create_pool(settings.postgres.owner_dsn, min_size=1, max_size=1)
    try:
        await write_limits(pool, tenant_id, "", {name: 10**9 for name in POLICY_FIELDS},
                           None, set_fail_open=False)
        await put_budget(pool, Budget(tenant_id, None, "month", MAX_BUDGET_USD, hard=True))
    finally:
        await pool.close()


def metadata(sample: Sample) -> dict[str, Any] | None:
    """The routing metadata of an answer (None for a failure or an answer without any)."""
    if not sample.ok:
        return None
    try:
        meta = orjson.loads(sample.last).get("metadata")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    return meta if isinstance(meta, dict) else None
