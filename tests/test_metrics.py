"""Metrics and probes on the real stack: after real traffic through the official OpenAI SDK,
every process's `/metrics` has the operations contract's families (docs/operations.md) with
the right labels, and the values moved by what was sent; every worker answers `/healthz` and
`/readyz` on its metrics port; the ingress's `/readyz` names a dependency that is down while
its `/healthz` stays 200."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import openai
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from compose.gateway import Gateway
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import ingress_behind_proxy
from topics import names
from topics.kafka import make_producer
from topics.settings import Settings
from workers.providers.base import Usage
from workers.router.metrics import RouterMetrics

NAMED, FALLBACK = "gpt-4o-mini", "claude-haiku-4-5"
# Three fast openai-dialect routes of three providers (tests/test_modes_e2e.py).
RACERS = ["deepseek-chat", "mistral-small-latest", "qwen-plus"]
HELLO: Any = [{"role": "user", "content": "count my tokens"}]
WORKERS = {"router-0": names.REQUESTS_GROUP, "usage": names.USAGE_GROUP,
           "audit": names.AUDIT_GROUP}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class Scrape:
    """One `/metrics` page, parsed."""

    def __init__(self, text: str) -> None:
        self.samples: Samples = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels`."""
        wanted = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and wanted <= ls)

    def labelsets(self, name: str) -> list[dict[str, str]]:
        return [dict(ls) for (n, ls) in self.samples if n == name]


async def scrape(url: str) -> Scrape:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(url)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


@pytest.fixture
async def sdk(gateway: Gateway, pg: asyncpg.Pool) -> AsyncIterator[openai.AsyncOpenAI]:
    key_id, key = await create_key(pg, f"metrics-{uuid.uuid4().hex[:8]}")
    client = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                                timeout=60)
    yield client
    await client.close()
    tenant_id = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


@pytest.fixture
async def urls(gateway: Gateway) -> dict[str, str]:
    """Every process's `/metrics` URL, once every worker answers its liveness probe (the
    gateway waits for its ingress alone)."""
    found = gateway.metrics_urls
    async with httpx.AsyncClient(timeout=10) as http:
        for name in WORKERS:
            async def alive(url: str = found[name].removesuffix("/metrics")) -> bool:
                try:
                    return (await http.get(f"{url}/healthz")).status_code == 200
                except httpx.TransportError:
                    return False  # still starting
            await eventually(alive, timeout_s=30)
    return found


async def test_every_worker_serves_probes_and_consumer_metrics_on_its_port(
        urls: dict[str, str]) -> None:
    assert set(WORKERS) | {"ingress"} <= set(urls)
    async with httpx.AsyncClient(timeout=10) as http:
        for name, group in WORKERS.items():
            base = urls[name].removesuffix("/metrics")
            assert (await http.get(f"{base}/healthz")).json() == {"status": "ok"}

            async def ready(base: str = base) -> dict[str, Any] | None:
                response = await http.get(f"{base}/readyz")
                body: dict[str, Any] = response.json()
                return body if response.status_code == 200 and body["partitions"] else None

            body = await eventually(ready, timeout_s=30)
            assert body["status"] == "ready"
            assert isinstance(body["lag"], int)
            assert (await http.get(f"{base}/nowhere")).status_code == 404

            async def measured(name: str = name, group: str = group,
                               partitions: int = body["partitions"]) -> Scrape | None:
                page = await scrape(urls[name])
                lags = [ls for ls in page.labelsets("switchyard_kafka_consumer_lag")
                        if ls["group"] == group]
                return page if len(lags) == partitions else None

            # Lag is measured every few seconds, per partition held, once fetched from.
            page = await eventually(measured, timeout_s=30)
            assert page.value("switchyard_kafka_partitions_assigned",
                              group=group) == body["partitions"]
            assert page.types["switchyard_kafka_commit_duration_seconds"] == "histogram"
            assert page.types["switchyard_dlq_messages"] == "counter"
            assert page.types["process_resident_memory_bytes"] == "gauge"


async def test_traffic_moves_the_ingress_router_and_usage_families(
        urls: dict[str, str], sdk: openai.AsyncOpenAI) -> None:
    ingress0, router0, usage0 = (await scrape(urls["ingress"]), await scrape(urls["router-0"]),
                                 await scrape(urls["usage"]))
    prompt = completion = 0
    served: set[tuple[str, str]] = set()
    for _ in range(3):
        answer = await sdk.chat.completions.create(model=NAMED, messages=HELLO)
        assert answer.usage is not None
        prompt += answer.usage.prompt_tokens
        completion += answer.usage.completion_tokens
        metadata: Any = getattr(answer, "metadata")  # noqa: B009 - ours, not the SDK's
        served.add((metadata["provider"], metadata["model"]))
    stream = await sdk.chat.completions.create(model=NAMED, messages=HELLO, stream=True,
                                               stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage is not None:
            prompt += chunk.usage.prompt_tokens
            completion += chunk.usage.completion_tokens
    assert len(served) == 1  # one route serves the named model here
    [(provider, model)] = served
    series = {"provider": provider, "model": model}

    ingress, router = await scrape(urls["ingress"]), await scrape(urls["router-0"])

    def moved(name: str, **labels: str) -> float:
        return router.value(name, **labels) - router0.value(name, **labels)

    assert moved("switchyard_router_attempts_total", status="ok", **series) == 4
    assert moved("switchyard_router_attempt_duration_seconds_count", **series) == 4
    assert moved("switchyard_router_ttft_seconds_count", **series) == 4
    assert moved("switchyard_router_tokens_total", kind="prompt", **series) == prompt
    assert moved("switchyard_router_tokens_total", kind="completion", **series) == completion
    assert moved("switchyard_router_cost_usd_total", **series) > 0
    assert all("tenant" not in ls for ls in router.labelsets("switchyard_router_tokens_total"))
    assert moved("switchyard_router_requests_total", mode="auto", outcome="ok") == 4
    assert moved("switchyard_classifier_labels_total") == 4  # this router classifies inline
    assert moved("switchyard_classifier_duration_seconds_count") >= 1
    assert ingress.value("switchyard_ingress_requests_total", route="/v1/chat/completions",
                         status="200", mode="default") - ingress0.value(
        "switchyard_ingress_requests_total", route="/v1/chat/completions", status="200",
        mode="default") == 4
    assert ingress.value("switchyard_ingress_request_duration_seconds_count",
                         route="/v1/chat/completions", mode="default") >= 4
    assert ingress.value("switchyard_ingress_reply_channel_up") == 1

    # The usage worker wrote the four attempts' rows, in batches, some time after each ended.
    async def written() -> Scrape | None:
        page = await scrape(urls["usage"])
        done = page.value("switchyard_usage_rows_total", outcome="written") - usage0.value(
            "switchyard_usage_rows_total", outcome="written")
        return page if done >= 4 else None

    usage = await eventually(written, timeout_s=30)
    assert usage.value("switchyard_usage_batch_size_count") > usage0.value(
        "switchyard_usage_batch_size_count")
    assert usage.value("switchyard_usage_write_lag_seconds_count") >= usage0.value(
        "switchyard_usage_write_lag_seconds_count") + 4


async def test_failovers_races_breakers_and_draws_are_counted(
        urls: dict[str, str], sdk: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    url = urls["router-0"]
    before = await scrape(url)
    await fake.configure(fail_models=[NAMED], error_status=503)
    answer = await sdk.chat.completions.create(model=NAMED, messages=HELLO,
                                               extra_body={"models": [NAMED, FALLBACK]})
    metadata: Any = getattr(answer, "metadata")  # noqa: B009
    assert metadata["fallback"] is True
    failed = {(a["provider"], a["model"]) for a in metadata["attempts"] if a["status"] != "ok"}
    await fake.configure(fail_models=[])
    stored = await sdk.put("/routing/policy", cast_to=dict[str, Any],
                           body={"allowed_models": RACERS})
    assert stored["source"] == "stored"
    raced = await sdk.chat.completions.create(
        model="auto", messages=HELLO, extra_headers={"x-switchyard-mode": "speculative"})
    assert getattr(raced, "metadata")["mode"] == "speculative"  # noqa: B009
    after = await scrape(url)

    def moved(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    assert moved("switchyard_router_failovers_total") >= 1
    for provider, model in failed:
        assert moved("switchyard_router_attempts_total", provider=provider, model=model,
                     status="error") >= 1
    assert moved("switchyard_router_races_total", outcome="answered") == 1
    assert moved("switchyard_router_requests_total", mode="speculative", outcome="ok") == 1
    # The race's routes were ranked by a Thompson draw over their posteriors, as read.
    assert moved("switchyard_bandit_draws_total") >= 1
    means = after.labelsets("switchyard_bandit_posterior_mean")
    for labels in after.labelsets("switchyard_bandit_draws_total"):
        assert labels in means
        assert 0 < after.value("switchyard_bandit_posterior_mean", **labels) < 1
    for labels in after.labelsets("switchyard_router_breaker_state"):
        assert after.value("switchyard_router_breaker_state", **labels) in (0, 1, 2)


async def test_ingress_probes_split_liveness_from_readiness(
        gateway: Gateway, tmp_path: Path) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"status": "ready", "checks": {
        "kafka": "ok", "redis": "ok", "postgres": "ok", "reply_channel": "ok"}}

    async with ingress_behind_proxy(gateway, tmp_path) as (url, proxy), \
            httpx.AsyncClient(base_url=url, timeout=10) as http:
        assert (await http.get("/readyz")).status_code == 200
        await proxy.cut()

        async def not_ready() -> httpx.Response | None:
            response = await http.get("/readyz")
            return response if response.status_code == 503 else None

        refused = await eventually(not_ready, timeout_s=15)
        checks = refused.json()["checks"]
        assert checks["redis"].startswith("down")
        assert checks["kafka"] == checks["postgres"] == "ok"
        # Liveness calls nothing: an outage must not get the ingress restarted.
        alive = await http.get("/healthz")
        assert alive.status_code == 200

        async def lost() -> Scrape | None:
            page = await scrape(f"{url}/metrics")
            return page if page.value("switchyard_ingress_reply_channel_up") == 0 else None

        page = await eventually(lost, timeout_s=15)
        assert page.value("switchyard_ingress_reply_channel_losses_total") >= 1


async def test_an_undecodable_message_is_counted_as_dead_lettered(
        gateway: Gateway, urls: dict[str, str]) -> None:
    before = await scrape(urls["usage"])
    producer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(names.USAGE, b"not a usage event", key=b"dlq-test")
    finally:
        await producer.stop()

    async def counted() -> bool:
        page = await scrape(urls["usage"])
        labels = {"group": names.USAGE_GROUP, "topic": names.USAGE, "reason": "undecodable"}
        return page.value("switchyard_dlq_messages_total", **labels) == before.value(
            "switchyard_dlq_messages_total", **labels) + 1

    assert await eventually(counted, timeout_s=30)


def test_tenants_label_tokens_and_cost_only_when_the_operator_enables_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().metrics.tenant_labels is False
    monkeypatch.setenv("SWITCHYARD_METRICS__TENANT_LABELS", "true")
    assert Settings().metrics.tenant_labels is True
    for enabled in (False, True):
        registry = CollectorRegistry()
        metrics = RouterMetrics(registry, tenant_labels=enabled)
        metrics.attempt("openai", "gpt-4o-mini", "ok", 120.0, 40.0, Usage(10, 5, 4),
                        Decimal("0.25"), "tenant-a")
        tenant = {"tenant": "tenant-a"} if enabled else {}
        series = {"provider": "openai", "model": "gpt-4o-mini", **tenant}
        assert registry.get_sample_value("switchyard_router_tokens_total",
                                         {**series, "kind": "prompt"}) == 10
        assert registry.get_sample_value("switchyard_router_tokens_total",
                                         {**series, "kind": "cached_prompt"}) == 4
        assert registry.get_sample_value("switchyard_router_cost_usd_total", series) == 0.25
        # Attempts and latency never carry a tenant.
        assert registry.get_sample_value("switchyard_router_attempts_total", {
            "provider": "openai", "model": "gpt-4o-mini", "status": "ok"}) == 1
