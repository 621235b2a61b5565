"""POST /v1/routing/preview on the real stack: the router answers with the decision a real
request gets, says what excluded the other routes (an open breaker, the tenant's policy, a
disabled provider of its own), and calls no provider."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg
import httpx

from compose.gateway import Gateway
from state.breakers import BreakerConfig, Breakers
from state.keys import create_key
from state.redis_client import make_redis
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import assert_error
from topics.routing_policy import CATEGORIES

HELLO = [{"role": "user", "content": "Write a Python function that reverses a list."}]


async def _preview(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/v1/routing/preview", json={"messages": HELLO, **body})
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


async def _served_by(http: httpx.AsyncClient, **body: Any) -> str:
    response = await http.post("/v1/chat/completions", json={"messages": HELLO, **body})
    assert response.status_code == 200, response.text
    provider: str = response.json()["metadata"]["provider"]
    return provider


async def test_preview_names_the_route_a_real_request_takes_and_calls_no_provider(
        http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    before = (await fake.stats())["requests_total"]
    answer = await _preview(http, model="gpt-4o-mini", max_tokens=100)
    assert (await fake.stats())["requests_total"] == before  # no provider call

    # The seed's shape and types.
    assert answer["selected_provider"] == "openai"
    assert answer["selected_model"] == "gpt-4o-mini"
    assert isinstance(answer["reason"], str)
    assert answer["reason"]
    assert isinstance(answer["confidence"], float)
    assert isinstance(answer["estimated_cost_usd"], float)
    assert isinstance(answer["estimated_latency_ms"], float)
    assert set(answer["semantic_classification"]) >= {"category", "confidence"}
    assert isinstance(answer["alternatives"], list)
    chosen = answer["eligible"][0]
    assert 0 < chosen["score"] < 1
    assert chosen["route"] == "gpt-4o-mini"
    # 100 output tokens at $0.60/Mtok plus the prompt's at $0.15/Mtok.
    assert 0.00006 < chosen["estimated_cost_usd"] < 0.0001

    assert await _served_by(http, model="gpt-4o-mini") == answer["selected_provider"]


async def test_auto_is_classified_and_the_tenants_policy_excludes_routes(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await create_key(pg, f"pv-{uuid.uuid4().hex[:10]}")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as tenant:
        put = await tenant.put("/v1/routing/policy", json={"allowed_providers": ["anthropic"]})
        assert put.status_code == 200, put.text
        before = (await fake.stats())["requests_total"]
        answer = await _preview(tenant, model="auto")
        assert (await fake.stats())["requests_total"] == before

        classification = answer["semantic_classification"]
        assert classification["category"] in (*CATEGORIES, "general")
        assert classification["source"] in ("classifier", "none")
        assert answer["selected_provider"] == "anthropic"
        assert {e["provider"] for e in answer["eligible"]} == {"anthropic"}
        by_policy = {e["provider"] for e in answer["excluded"] if e["code"] == "policy"}
        assert {"openai", "gemini"} <= by_policy
        assert all("allowed_providers" in e["reason"] for e in answer["excluded"]
                   if e["code"] == "policy")

        assert await _served_by(tenant, model="auto") == "anthropic"


async def test_an_open_breaker_excludes_a_route_and_preview_says_so(
        gateway: Gateway, http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    model, closed_route, open_route = ("llama-3.3-70b", "together/llama-3.3-70b-instruct-turbo",
                                       "groq/llama-3.3-70b-versatile")
    client = make_redis(gateway.settings.redis)
    try:
        breakers = Breakers(client, BreakerConfig.from_settings(gateway.settings.router))
        await breakers.record(open_route, False, open_now=True)

        async def excluded() -> dict[str, Any]:
            answer = await _preview(http, model=model)
            codes = {e["route"]: e["code"] for e in answer["excluded"]}
            return answer if codes.get(open_route) == "breaker_open" else {}

        before = (await fake.stats())["requests_total"]
        answer = await eventually(excluded, timeout_s=10, every_s=0.2)
        assert (await fake.stats())["requests_total"] == before
        assert answer["selected_route"] == closed_route
        assert [e["route"] for e in answer["eligible"]] == [closed_route]
        assert await _served_by(http, model=model) == answer["selected_provider"] == "together"
    finally:
        await client.aclose()


async def test_a_tenant_provider_is_previewed_and_its_disabling_explained(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await create_key(pg, f"pv-{uuid.uuid4().hex[:10]}")
    assert gateway.settings.fallback_upstream_url is not None
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as tenant:
        created = (await tenant.post("/v1/providers/register", json={
            "name": "acme", "type": "openai-compatible",
            "base_url": gateway.settings.fallback_upstream_url,
            "models": [{"name": "acme-llm", "input_per_mtok": "1", "output_per_mtok": "3"}],
        })).json()
        before = (await fake.stats())["requests_total"]
        answer = await _preview(tenant, model="acme-llm", max_tokens=1000)
        assert answer["selected_provider"] == created["id"]
        assert answer["selected_route"] == f"{created['id']}/acme-llm"
        assert answer["estimated_cost_usd"] >= 0.003  # 1000 output tokens at $3/Mtok
        assert (await fake.stats())["requests_total"] == before
        assert await _served_by(tenant, model="acme-llm") == created["id"]

        await tenant.put(f"/v1/providers/{created['id']}", json={"enabled": False})

        async def disabled() -> dict[str, Any]:
            answer = await _preview(tenant, model="auto")
            return next((e for e in answer["excluded"] if e["code"] == "provider_disabled"),
                        {})

        entry = await eventually(disabled, timeout_s=10)
        assert entry["route"] == f"{created['id']}/acme-llm"
        assert "acme" in entry["reason"]
        assert_error(await tenant.post("/v1/routing/preview", json={
            "model": "acme-llm", "messages": HELLO}), 404, "model_not_found")


async def test_an_unsure_label_pins_nothing_and_preview_says_why(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    """The tenant pins every category to one model. With `pin_min_confidence` at 1 no label
    of the classifier is sure enough: the request is routed as `general`, over every model;
    a client's category hint (no confidence) still pins."""
    _, key = await create_key(pg, f"pv-{uuid.uuid4().hex[:10]}")
    pinned = "claude-sonnet-4-6"
    vague = [{"role": "user", "content": "Tell me about the river and what it means."}]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as tenant:
        async def with_policy(threshold: float) -> dict[str, Any]:
            put = await tenant.put("/v1/routing/policy", json={
                "pinned_routes": dict.fromkeys(CATEGORIES, pinned),
                "pin_min_confidence": threshold})
            assert put.status_code == 200, put.text
            assert put.json()["policy"]["pin_min_confidence"] == threshold

            async def applied() -> dict[str, Any]:
                answer = await _preview(tenant, model="auto", messages=vague)
                pins = answer["selected_route"] == pinned and len(answer["eligible"]) == 1
                return answer if pins == (threshold == 0.0) else {}
            answer: dict[str, Any] = await eventually(applied, timeout_s=15, every_s=0.3)
            return answer

        sure = await with_policy(0.0)
        label = sure["semantic_classification"]
        assert label["routed_as"] == label["category"] in CATEGORIES
        assert label["source"] == "classifier"
        confidence = label["confidence"]
        assert 0 < confidence < 1

        unsure = await with_policy(1.0)
        label = unsure["semantic_classification"]
        assert label["routed_as"] == "general"
        assert label["category"] == sure["semantic_classification"]["category"]
        assert len(unsure["eligible"]) > 1  # the router's choice, not the pin
        assert "pin_min_confidence 1.0" in unsure["reason"]
        assert f"confidence {confidence}" in unsure["reason"]

        hinted = await tenant.post("/v1/routing/preview", headers={
            "x-switchyard-category": "code"}, json={"model": "auto", "messages": vague})
        assert hinted.status_code == 200, hinted.text
        assert hinted.json()["selected_route"] == pinned
        assert hinted.json()["semantic_classification"]["source"] == "client"
