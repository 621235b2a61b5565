"""Session fixtures: one real stack (Kafka KRaft, Redis, PostgreSQL) and one gateway (ingress,
router, usage worker, fake upstream as child processes) shared by the suite. Each fixture
stops what it starts. And what a hung asyncio test reports when pytest-timeout stops it."""

from __future__ import annotations

import asyncio
import gc
import signal
import traceback
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
import httpx
import openai
import pytest
import redis.asyncio as redis

from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from state.breakers import KEY_PREFIX
from state.keys import create_key, find_key
from state.limits import lift_limits
from state.redis_client import make_redis
from state.vault import MasterKeys
from topics.catalog import load_catalog
from topics.sessions import SigningKeys
from topics.settings import AuthSettings, RouterSettings, Settings, VaultSettings

# Its models have no key in the environment: they exercise the offline fallback route.
FALLBACK_ONLY_PROVIDER = "minimax"

# --------------------------------------------------------------------- a hung asyncio test
# pytest-timeout's SIGALRM lands in the event loop's select(), so its traceback shows the loop
# waiting, not what the test awaits. At that moment the loop is still running: record where
# each of its tasks is suspended, down its await chain, and show it beside the failure.

_TASKS_AT_TIMEOUT = pytest.StashKey[str]()


@pytest.hookimpl(wrapper=True, optionalhook=True)  # a pytest-timeout hook
def pytest_timeout_set_timer(item: pytest.Item, settings: Any) -> Generator[None, Any, Any]:
    installed = yield
    timeout_handler = signal.getsignal(signal.SIGALRM)
    if settings.method == "signal" and callable(timeout_handler):
        def handler(signum: int, frame: FrameType | None) -> None:
            __tracebackhide__ = True
            item.stash[_TASKS_AT_TIMEOUT] = _suspended_tasks()
            timeout_handler(signum, frame)

        signal.signal(signal.SIGALRM, handler)
    return installed


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item,
                              call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    tasks = item.stash.get(_TASKS_AT_TIMEOUT, None)
    if tasks is not None:
        del item.stash[_TASKS_AT_TIMEOUT]
        report.sections.append(("asyncio tasks at the timeout", tasks))
    return report


def _suspended_tasks() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "(no event loop was running)"
    out: list[str] = []
    for task in asyncio.all_tasks(loop):
        frames: list[tuple[FrameType, int]] = []
        awaited: Any = task.get_coro()
        while awaited is not None:  # the coroutine, what it awaits, what that awaits...
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
            if frame is not None:
                frames.append((frame, frame.f_lineno))
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "gi_yieldfrom", None)
        stack = "".join(traceback.StackSummary.extract(frames).format())
        out.append(f"{task!r}\n{stack}")
    return "\n".join(out)


class FakeAdmin:
    """The fake upstream's admin API (knobs and counters)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._http = httpx.AsyncClient(base_url=url.removesuffix("/v1"), timeout=10)

    async def configure(self, **knobs: Any) -> None:
        (await self._http.put("/_fake/config", json=knobs)).raise_for_status()

    async def stats(self) -> dict[str, Any]:
        response = await self._http.get("/_fake/stats")
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    async def reset(self) -> None:
        (await self._http.post("/_fake/reset")).raise_for_status()
        await self.configure(ttft_ms=0, inter_token_ms=0, tokens=16, error_rate=0,
                             outage=False, cut_after_tokens=None, prompt_tokens_override=None,
                             cached_tokens=0, omit_stream_usage=False, fail_models=[])

    async def aclose(self) -> None:
        await self._http.aclose()


@pytest.fixture(scope="module", autouse=True)
def _leaks_show_in_their_module() -> Iterator[None]:
    """Collect garbage as each module ends: an unclosed connection or socket it left behind
    is then reported (ResourceWarning, an error here) against that module, not against
    whichever later test the collector happened to run in."""
    yield
    gc.collect()


@pytest.fixture(scope="session")
def stack() -> Iterator[LocalStack]:
    # Short session timeout: a killed router's partitions move to the survivor quickly.
    # Short council member timeout: tests/test_modes_e2e.py drops a slow member.
    base = Settings(router=RouterSettings(shutdown_grace_s=5, council_member_timeout_s=2.0))
    with LocalStack.ephemeral(base) as local:
        yield local


@pytest.fixture(scope="session")
def gateway(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """Every provider's endpoint is the fake upstream, which speaks all three dialects. Each
    provider has a key in the environment except the one left to the offline fallback."""
    fake_port = free_port()
    fake = f"http://127.0.0.1:{fake_port}"
    catalog = load_catalog(stack.settings.catalog_path)
    settings = stack.settings.model_copy(update={
        # Small limits keep the oversized-input tests light.
        "ingress": stack.settings.ingress.model_copy(update={
            "port": free_port(), "max_body_bytes": 2_000_000, "max_image_bytes": 500_000}),
        "fallback_upstream_url": f"{fake}/v1",
        # A fresh vault master key per session (tests/test_vault.py).
        "vault": VaultSettings(master_keys=MasterKeys.generate("k1"), active_key_id="k1",
                               cache_ttl_s=0.5),
        # Fresh session signing keys per session (tests/test_sessions.py): s2 verifies only.
        "auth": AuthSettings(signing_keys=f"{SigningKeys.generate('s1')},"
                             f"{SigningKeys.generate('s2')}", active_signing_key="s1"),
        "provider_base_urls": {
            name: fake + ("/v1beta" if p.dialect == "gemini" else "/v1")
            for name, p in catalog.providers.items() if name != FALLBACK_ONLY_PROVIDER},
    })
    keys = {p.api_key_env: f"env-key-{name}" for name, p in catalog.providers.items()
            if name != FALLBACK_ONLY_PROVIDER}
    logs: Path = tmp_path_factory.mktemp("gateway-logs")
    # Every worker serves its metrics and probes (tests/test_metrics.py), on a free port.
    metrics_ports = {name: free_port() for name in ("router-0", "usage", "audit", "classifier")}
    with Gateway(settings, logs, fake_upstream_port=fake_port, extra_env=keys,
                 metrics_ports=metrics_ports) as running:
        yield running


@pytest.fixture(scope="session")
async def pg(stack: LocalStack) -> AsyncIterator[asyncpg.Pool]:
    """The owner role's pool (`postgres.owner_dsn`, the local stack's superuser): what the
    admin commands use, and what a test uses to set up and inspect every tenant's rows."""
    pool = await asyncpg.create_pool(stack.settings.postgres.owner_dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
async def app_pg(stack: LocalStack) -> AsyncIterator[asyncpg.Pool]:
    """The application role's pool (`postgres.dsn`): what the gateway's processes use, bound
    by row-level security."""
    pool = await asyncpg.create_pool(stack.settings.postgres.dsn, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture
async def r(stack: LocalStack) -> AsyncIterator[redis.Redis]:
    """A client of the session stack's Redis (one worker's connection pool)."""
    client = make_redis(stack.settings.redis)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def api_key(pg: asyncpg.Pool) -> str:
    _, key = await create_key(pg, "tests")
    # The suite's shared tenant is not what rate limits are tested on (tests/test_limits.py):
    # its tier's 50 concurrent requests would refuse the load tests.
    record = await find_key(pg, key)
    assert record is not None
    await lift_limits(pg, record.tenant_id)
    return key


@pytest.fixture(scope="session")
async def api_key_ids(pg: asyncpg.Pool, api_key: str) -> tuple[str, str]:
    """(tenant id, key id) of `api_key`: what a batch producer's envelope names."""
    record = await find_key(pg, api_key)
    assert record is not None
    return record.tenant_id, record.key_id


@pytest.fixture(scope="session")
async def fake_admin(gateway: Gateway) -> AsyncIterator[FakeAdmin]:
    assert gateway.settings.fallback_upstream_url is not None
    admin = FakeAdmin(gateway.settings.fallback_upstream_url)
    yield admin
    await admin.aclose()


@pytest.fixture
async def fake(fake_admin: FakeAdmin, gateway: Gateway) -> AsyncIterator[FakeAdmin]:
    """The fake upstream, reset to its defaults before and after the test, and every circuit
    breaker closed: a test that injects failures must not leave routes open for the next."""
    await fake_admin.reset()
    await reset_breakers(gateway)
    yield fake_admin
    await fake_admin.reset()
    await reset_breakers(gateway)


async def reset_breakers(gateway: Gateway) -> None:
    client = make_redis(gateway.settings.redis)
    try:
        keys = [key async for key in client.scan_iter(match=f"{KEY_PREFIX}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    # Routers see it within their breaker cache's lifetime.
    await asyncio.sleep(gateway.settings.router.breaker_cache_ttl_s)


@pytest.fixture
async def client(gateway: Gateway, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI SDK, pointed at the gateway. No retries: we test what it sees."""
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0,
                             timeout=60)
    yield sdk
    await sdk.close()


@pytest.fixture
async def http(gateway: Gateway, api_key: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60,
                                 headers={"Authorization": f"Bearer {api_key}"}) as raw:
        yield raw


async def eventually(check: Any, timeout_s: float = 15.0, every_s: float = 0.1) -> Any:
    """Poll `check()` (sync or async) until it returns a truthy value; return that value."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)
