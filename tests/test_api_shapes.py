"""The API shapes users bring: the seed product's /v1/infer, `policy` and `metadata` objects
and X-Tenant-ID; embeddings; the priced catalog; exact cost in every response."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import asyncpg
import httpx
import openai
import pytest

from tests.conftest import FALLBACK_ONLY_PROVIDER, FakeAdmin, eventually
from tests.test_errors import assert_openai_error

HELLO: Any = [{"role": "user", "content": "shapes please"}]


async def test_infer_is_chat_completions_under_the_seed_name(http: httpx.AsyncClient,
                                                             fake: FakeAdmin) -> None:
    response = await http.post("/v1/infer", json={"model": "gpt-4o-mini", "messages": HELLO})
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"].startswith("shapes-0 ")
    metadata = body["metadata"]
    # The seed's four fields, then ours: the model, the mode, whether a fallback served it
    # and every attempt made.
    assert set(metadata) == {"provider", "model", "latency_ms", "cost_usd", "cost_usd_exact",
                             "cache_hit", "mode", "fallback", "attempts"}
    assert metadata["mode"] == "auto"
    assert metadata["fallback"] is False
    assert [a["status"] for a in metadata["attempts"]] == ["ok"]
    assert metadata["attempts"][0]["cost_usd_exact"] == metadata["cost_usd_exact"]


async def test_policy_provider_serves_the_same_class_from_that_provider(
        http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    response = await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": HELLO,
        "policy": {"provider": "xai", "optimize_for": "cost", "fallback_enabled": False},
        "metadata": {"team": "search", "ticket": "42"}})
    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert (metadata["provider"], metadata["model"]) == ("xai", "grok-4-1-fast")


async def test_policy_timeout_ms_is_the_deadline(http: httpx.AsyncClient,
                                                 fake: FakeAdmin) -> None:
    await fake.configure(ttft_ms=3000)
    response = await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": HELLO, "policy": {"timeout_ms": 300}})
    assert_openai_error(response, 504, "deadline_exceeded")


@pytest.mark.parametrize(("policy", "status", "code", "param"), [
    ({"provider": "openia"}, 400, "unknown_provider", "policy.provider"),
    ({"provider": "deepseek"}, 400, "policy_conflict", "policy.provider"),  # no frontier model
    ("fast", 422, "invalid_field", "policy"),
    ({"timeout_ms": -5}, 422, "invalid_field", "policy.timeout_ms"),
    ({"timeout_ms": 10_000_000}, 422, "invalid_field", "policy.timeout_ms"),
    ({"optimize_for": "vibes"}, 422, "invalid_field", "policy.optimize_for"),
    ({"fallback_enabled": "yes"}, 422, "invalid_field", "policy.fallback_enabled"),
    ({"surprise": 1}, 422, "invalid_field", "policy.surprise"),
])
async def test_bad_policies_are_refused_with_the_field_named(
        http: httpx.AsyncClient, policy: Any, status: int, code: str, param: str) -> None:
    body = {"model": "gpt-4o", "messages": HELLO, "policy": policy}
    assert_openai_error(await http.post("/v1/chat/completions", json=body), status, code, param)


async def test_x_tenant_id_is_accepted_only_for_the_keys_own_tenant(
        http: httpx.AsyncClient, pg: asyncpg.Pool, api_key: str, fake: FakeAdmin) -> None:
    own = await pg.fetchval("SELECT tenant_id FROM api_keys JOIN tenants t ON t.id = tenant_id"
                            " WHERE t.name = 'tests'")
    ok = await http.post("/v1/chat/completions", headers={"X-Tenant-ID": own},
                         json={"model": "gpt-4o-mini", "messages": HELLO})
    assert ok.status_code == 200
    other = await http.post("/v1/chat/completions", headers={"X-Tenant-ID": "t_someone_else"},
                            json={"model": "gpt-4o-mini", "messages": HELLO})
    assert_openai_error(other, 403, "tenant_mismatch", "X-Tenant-ID")


async def test_an_alias_is_served_by_its_model(http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    response = await http.post("/v1/chat/completions", json={"model": "grok", "messages": HELLO})
    assert response.json()["metadata"]["model"] == "grok-4.3"


async def test_a_provider_without_key_goes_to_the_offline_fallback(
        http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    assert FALLBACK_ONLY_PROVIDER == "minimax"
    response = await http.post("/v1/chat/completions",
                               json={"model": "minimax-m2", "messages": HELLO})
    assert response.json()["metadata"]["provider"] == "local-fallback"


async def test_embeddings_through_the_pipeline_with_usage_and_cost(
        client: openai.AsyncOpenAI, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    response = await client.embeddings.with_raw_response.create(
        model="text-embedding-3-small", input=["alpha beta", "gamma"])
    result = response.parse()
    assert [d.index for d in result.data] == [0, 1]
    assert all(len(d.embedding) == 8 for d in result.data)
    assert result.usage.prompt_tokens == 3
    body = response.http_response.json()
    # 3 tokens at $0.02 per million
    exact = body["metadata"]["cost_usd_exact"]
    assert Decimal(exact) == Decimal("0.00000006")
    assert "E" not in exact.upper()  # fixed-point digits, never 6E-8
    assert body["metadata"]["cost_usd"] == 0.00000006  # a JSON number with those digits

    request_id = response.headers["x-request-id"]
    rows = await eventually(lambda: pg.fetch(
        "SELECT * FROM usage_events WHERE request_id = $1", request_id))
    assert (rows[0]["model"], rows[0]["prompt_tokens"], rows[0]["completion_tokens"]) == (
        "text-embedding-3-small", 3, 0)


@pytest.mark.parametrize(("route", "body"), [
    ("/v1/chat/completions", {"model": "text-embedding-3-small", "messages": HELLO}),
    ("/v1/embeddings", {"model": "gpt-4o-mini", "input": "x"}),
])
async def test_a_model_of_the_wrong_kind_is_refused(http: httpx.AsyncClient, route: str,
                                                    body: dict[str, Any]) -> None:
    assert_openai_error(await http.post(route, json=body), 400, "wrong_model_kind", "model")


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "text-embedding-3-small"}, "input"),
    ({"model": "text-embedding-3-small", "input": []}, "input"),
    ({"model": "text-embedding-3-small", "input": ["ok", ""]}, "input"),
    ({"model": "text-embedding-3-small", "input": "x", "encoding_format": "hex"},
     "encoding_format"),
])
async def test_bad_embeddings_requests_are_422(http: httpx.AsyncClient, body: dict[str, Any],
                                               param: str) -> None:
    response = await http.post("/v1/embeddings", json=body)
    assert response.status_code == 422
    assert response.json()["error"]["param"] == param


async def test_models_serve_the_priced_catalog(client: openai.AsyncOpenAI) -> None:
    models = {m.id: m.model_dump() async for m in client.models.list()}
    providers = {m["owned_by"] for m in models.values()}
    assert providers == {"openai", "anthropic", "gemini", "xai", "mistral", "deepseek",
                         "moonshot", "qwen", "minimax", "groq", "together"}
    sonnet = models["claude-sonnet-4-6"]
    assert sonnet["pricing"]["input_per_mtok"] == "3.00"
    assert sonnet["pricing"]["cached_input_per_mtok"] == "0.30"
    assert "claude-sonnet" in sonnet["aliases"]
    assert sonnet["class"] == "code"
    assert "tools" in sonnet["capabilities"]


async def test_streamed_cost_equals_the_hand_computation(client: openai.AsyncOpenAI,
                                                         fake: FakeAdmin) -> None:
    await fake.configure(tokens=40, prompt_tokens_override=1000, cached_tokens=600)
    stream = await client.chat.completions.create(
        model="gpt-5.4-mini", messages=HELLO, stream=True,
        stream_options={"include_usage": True})
    last = [chunk async for chunk in stream][-1]
    metadata = (last.model_extra or {})["metadata"]
    # 400 uncached in at $0.75/M + 600 cached at $0.075/M + 40 out at $4.50/M
    expected = (400 * Decimal("0.75") + 600 * Decimal("0.075") + 40 * Decimal("4.50")) / 10**6
    assert Decimal(metadata["cost_usd_exact"]) == expected
    assert last.usage is not None
    assert last.usage.prompt_tokens_details is not None
    assert last.usage.prompt_tokens_details.cached_tokens == 600


@pytest.mark.parametrize(("tool", "param"), [
    ({"type": "function", "function": {"name": "has spaces"}}, "tools.0.function.name"),
    ({"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}},
     "tools.0.function.parameters"),
    ({"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": ["q"]}}}, "tools.0.function.parameters"),
    ({"type": "retrieval"}, "tools.0.type"),
    ({"type": "function"}, "tools.0.function"),
])
async def test_a_malformed_tool_schema_is_422(http: httpx.AsyncClient, tool: dict[str, Any],
                                              param: str) -> None:
    response = await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": HELLO, "tools": [tool]})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == param


async def test_an_oversized_image_is_413_naming_it(http: httpx.AsyncClient,
                                                    gateway: Any) -> None:
    limit = gateway.settings.ingress.max_image_bytes
    image = "data:image/png;base64," + "A" * (limit * 4 // 3 + 8)
    response = await http.post("/v1/chat/completions", json={
        "model": "gpt-4o-mini", "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": image}}]}]})
    assert_openai_error(response, 413, "image_too_large", "messages.0.content.1.image_url")


async def test_gemini_embeddings_through_the_pipeline_are_billed_as_estimated(
        client: openai.AsyncOpenAI, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    response = await client.embeddings.with_raw_response.create(
        model="gemini-embedding-001", input=["one two three", "four"], dimensions=16)
    result = response.parse()
    assert [len(d.embedding) for d in result.data] == [16, 16]
    assert result.usage.prompt_tokens > 0
    rows = await eventually(lambda: pg.fetch(
        "SELECT * FROM usage_events WHERE request_id = $1", response.headers["x-request-id"]))
    assert (rows[0]["provider"], rows[0]["estimated"]) == ("gemini", True)
    assert rows[0]["prompt_tokens"] == result.usage.prompt_tokens  # billed what was shown
    assert rows[0]["cost_usd"] == rows[0]["prompt_tokens"] * Decimal("0.15") / 10**6
