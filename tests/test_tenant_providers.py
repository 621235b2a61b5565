"""Providers a tenant registers itself (the seed product's /v1/providers), end to end on the
real stack: the fake upstream registered as a tenant's provider serves that tenant's requests
(official openai SDK), with its key from the vault, billed at the declared prices; another
tenant can neither use nor see it; update, disable, delete, test and health work."""

from __future__ import annotations

import uuid
from decimal import Decimal
from typing import Any

import anthropic
import asyncpg
import httpx
import openai
import pytest

from compose.gateway import Gateway
from compose.stack import free_port
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import assert_error, ingresses, rfc3339
from topics.identity import Role

HELLO = [{"role": "user", "content": "hello from my own provider"}]


def _tenant_client(gateway: Gateway, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=gateway.url, timeout=30,
                             headers={"Authorization": f"Bearer {api_key}"})


def _tenant_client_at(url: str, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30,
                             headers={"Authorization": f"Bearer {api_key}"})


def _sdk(gateway: Gateway, api_key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0,
                              timeout=60)


def _fake_url(gateway: Gateway) -> str:
    assert gateway.settings.fallback_upstream_url is not None
    return gateway.settings.fallback_upstream_url  # ends in /v1: OpenAI's base URL shape


async def _new_tenant(pg: asyncpg.Pool, role: Role = Role.TENANT_ADMIN) -> tuple[str, str]:
    """(tenant name, key) of a fresh tenant."""
    name = f"tp-{uuid.uuid4().hex[:10]}"
    _, key = await create_key(pg, name, role=role)
    return name, key


async def _register(http: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await http.post("/v1/providers/register", json=body)
    assert response.status_code == 201, response.text
    created: dict[str, Any] = response.json()
    return created


async def test_a_registered_provider_serves_its_tenant_only_billed_at_declared_prices(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key_a = await _new_tenant(pg)
    _, key_b = await _new_tenant(pg)
    secret = f"sk-acme-{uuid.uuid4().hex}"
    async with _tenant_client(gateway, key_a) as a, _tenant_client(gateway, key_b) as b:
        created = await _register(a, name="acme", type="openai-compatible",
                                  base_url=_fake_url(gateway), api_key=secret,
                                  models=[{"name": "acme-llm", "input_per_mtok": "2.00",
                                           "output_per_mtok": "8.00"}],
                                  priority=5, weight=2.5, enabled=True)
        # The seed's shape, with its JSON types; never the key.
        assert isinstance(created["id"], str)
        assert created["id"].startswith("tp_")
        assert (created["name"], created["type"], created["models"], created["enabled"],
                created["status"]) == ("acme", "openai-compatible", ["acme-llm"], True,
                                       "active")
        assert created["priority"] == 5
        assert created["weight"] == 2.5
        assert created["has_api_key"] is True
        assert secret not in str(created)
        provider_id = created["id"]
        listed = (await a.get("/v1/providers")).json()["providers"]
        assert [p["id"] for p in listed] == [provider_id]

        # Listed with the official SDK, routed by its bare name and by provider/model.
        async with _sdk(gateway, key_a) as sdk:
            listed_models = {m.id: m for m in (await sdk.models.list()).data}
            assert f"{provider_id}/acme-llm" in listed_models
            assert "gpt-4o-mini" in listed_models
            for name in ("acme-llm", "acme/acme-llm"):
                raw = await sdk.chat.completions.with_raw_response.create(
                    model=name, messages=HELLO)  # type: ignore[arg-type]
                answer = raw.parse()
                assert answer.choices[0].message.content
                metadata = raw.http_response.json()["metadata"]
                assert metadata["provider"] == provider_id
                assert (await fake.stats())["last_authorization"] == f"Bearer {secret}"
                assert (await fake.stats())["call_log"][-1]["model"] == "acme-llm"

        # Billed at the declared prices, in the ledger and in GET /v1/usage.
        tenant_a = (await a.get("/v1/usage")).json()

        async def ledger() -> list[asyncpg.Record]:
            rows = await pg.fetch("SELECT * FROM usage_events WHERE provider = $1",
                                  provider_id)
            return rows if len(rows) == 2 else []

        rows = await eventually(ledger)
        for row in rows:
            assert row["model"] == f"{provider_id}/acme-llm"
            expected = (Decimal(row["prompt_tokens"]) * 2
                        + Decimal(row["completion_tokens"]) * 8) / 1_000_000
            assert row["cost_usd"] == expected
            assert row["cost_usd"] > 0

        async def usage_shows_it() -> dict[str, Any]:
            body: dict[str, Any] = (await a.get("/v1/usage")).json()
            return body if body["total_requests"] >= 2 else {}

        usage = await eventually(usage_shows_it)
        assert Decimal(usage["total_cost_usd_exact"]) == sum(r["cost_usd"] for r in rows)
        assert tenant_a["object"] == "usage"

        # Another tenant: the name is unknown, the provider invisible and untouchable.
        async with _sdk(gateway, key_b) as other:
            assert f"{provider_id}/acme-llm" not in {
                m.id for m in (await other.models.list()).data}
            for name in ("acme-llm", "acme/acme-llm", f"{provider_id}/acme-llm"):
                with pytest.raises(openai.NotFoundError) as refused:
                    await other.chat.completions.create(model=name, messages=HELLO)  # type: ignore[arg-type]
                assert refused.value.code == "model_not_found"
        assert (await b.get("/v1/providers")).json()["providers"] == []
        assert_error(await b.put(f"/v1/providers/{provider_id}", json={"enabled": False}),
                     404, "provider_not_found")
        assert_error(await b.delete(f"/v1/providers/{provider_id}"), 404,
                     "provider_not_found")
        assert_error(await b.get(f"/v1/providers/{provider_id}/health"), 404,
                     "provider_not_found")

        async def audited() -> list[dict[str, Any]]:
            entries: list[dict[str, Any]] = (await a.get(
                "/v1/audit", params={"action": "provider.registered"})).json()["entries"]
            return entries

        entry = (await eventually(audited))[0]
        assert secret not in str(entry)

    for name in gateway.processes:
        assert secret not in gateway.log_file(name).read_text(errors="replace")


async def test_update_disable_and_delete_take_effect_on_routing(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _new_tenant(pg)
    async with _tenant_client(gateway, key) as a, _sdk(gateway, key) as sdk:
        created = await _register(a, name="mine", type="openai", base_url=_fake_url(gateway),
                                  models=["mine-llm"])
        provider_id = created["id"]
        assert created["has_api_key"] is False
        await sdk.chat.completions.create(model="mine-llm", messages=HELLO)  # type: ignore[arg-type]

        disabled = await a.put(f"/v1/providers/{provider_id}", json={"enabled": False})
        assert disabled.status_code == 200, disabled.text
        assert disabled.json()["status"] == "disabled"

        async def refused() -> bool:
            try:
                await sdk.chat.completions.create(model="mine-llm", messages=HELLO)  # type: ignore[arg-type]
            except openai.NotFoundError as exc:
                return exc.code == "model_not_found"
            return False

        await eventually(refused, timeout_s=10)

        # Enabled again under a new model and a key: routed, with that key.
        new_key = f"sk-new-{uuid.uuid4().hex}"
        updated = await a.put(f"/v1/providers/{provider_id}", json={
            "enabled": True, "models": ["mine-llm-2"], "api_key": new_key})
        assert updated.status_code == 200, updated.text
        assert updated.json()["models"] == ["mine-llm-2"]
        assert updated.json()["has_api_key"] is True

        async def served() -> bool:
            try:
                await sdk.chat.completions.create(model="mine-llm-2", messages=HELLO)  # type: ignore[arg-type]
            except openai.APIError:
                return False
            return bool((await fake.stats())["last_authorization"] == f"Bearer {new_key}")

        await eventually(served, timeout_s=10)

        # Names are unique per tenant.
        await _register(a, name="second", type="openai", base_url=_fake_url(gateway))
        assert_error(await a.put(f"/v1/providers/{provider_id}", json={"name": "second"}),
                     409, "provider_exists")

        deleted = await a.delete(f"/v1/providers/{provider_id}")
        assert deleted.status_code == 200
        assert deleted.json()["deleted"] is True
        assert provider_id not in {p["id"] for p in
                                   (await a.get("/v1/providers")).json()["providers"]}
        assert provider_id not in {k["provider"] for k in
                                   (await a.get("/v1/vault/keys")).json()["keys"]}
        with pytest.raises(openai.NotFoundError):
            await sdk.chat.completions.create(model="mine-llm-2", messages=HELLO)  # type: ignore[arg-type]
        assert_error(await a.delete(f"/v1/providers/{provider_id}"), 404,
                     "provider_not_found")


async def test_test_and_health_probe_for_real_including_a_dead_port(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _new_tenant(pg)
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with _tenant_client(gateway, key) as a:
        ok = (await a.post("/v1/providers/test", json={
            "name": "probe", "type": "openai-compatible", "base_url": _fake_url(gateway),
            "api_key": "sk-probe-0000"})).json()
        assert ok["success"] is True
        assert isinstance(ok["latency_ms"], float)
        assert "error" not in ok
        failed = (await a.post("/v1/providers/test", json={
            "name": "probe", "type": "openai-compatible", "base_url": dead})).json()
        assert failed["success"] is False
        assert isinstance(failed["error"], str)
        assert isinstance(failed["latency_ms"], float)

        dead_one = await _register(a, name="dead", type="openai", base_url=dead,
                                   models=["dead-llm"])
        health = (await a.get(f"/v1/providers/{dead_one['id']}/health")).json()
        assert health["provider_id"] == dead_one["id"]
        assert health["status"] == "unhealthy"
        assert health["error"]
        rfc3339(health["last_check"])

        live = await _register(a, name="live", type="openai", base_url=_fake_url(gateway),
                               models=["live-llm"])
        health = (await a.get(f"/v1/providers/{live['id']}/health")).json()
        assert health["status"] == "healthy", health
        assert isinstance(health["latency_ms"], float)
        assert health["breakers"] == [{"route": f"{live['id']}/live-llm", "state": "closed"}]

        # A disabled provider is not probed.
        await a.put(f"/v1/providers/{live['id']}", json={"enabled": False})
        health = (await a.get(f"/v1/providers/{live['id']}/health?refresh=true")).json()
        assert health["status"] == "disabled"


async def test_shapes_are_checked_and_viewers_only_read(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    tenant, admin_key = await _new_tenant(pg)
    _, viewer_key = await create_key(pg, tenant, role=Role.VIEWER)
    async with _tenant_client(gateway, admin_key) as a, \
            _tenant_client(gateway, viewer_key) as viewer:
        assert_error(await a.post("/v1/providers/register", json={
            "name": "x", "type": "no-such-dialect", "base_url": "http://h/v1"}),
            400, "invalid_provider")
        assert_error(await a.post("/v1/providers/register", json={
            "name": "x", "type": "openai-compatible"}), 400, "invalid_provider")
        bad = await a.post("/v1/providers/register", json={
            "name": "x", "type": "openai", "base_url": "ftp://h", "models": [1]})
        assert bad.status_code == 422, bad.text
        bad = await a.post("/v1/providers/register", json={
            "name": "x", "type": "openai", "base_url": "http://h/v1",
            "models": [{"name": "m", "input_per_mtok": "-1"}]})
        assert bad.status_code == 422, bad.text

        # A named provider of the catalog gives the dialect and the default base URL.
        named = await _register(a, name="my-anthropic", type="anthropic",
                                base_url="http://127.0.0.1:9/v1", models=["claude-x"])
        assert named["dialect"] == "anthropic"
        mistral = await _register(a, name="my-mistral", type="mistral")
        assert mistral["dialect"] == "openai"
        assert mistral["base_url"] == "https://api.mistral.ai/v1"

        assert (await viewer.get("/v1/providers")).status_code == 200
        assert (await viewer.get(f"/v1/providers/{named['id']}/health")).status_code == 200
        assert_error(await viewer.post("/v1/providers/register", json={
            "name": "v", "type": "openai", "base_url": "http://h/v1"}), 403,
            "permission_denied")
        assert_error(await viewer.delete(f"/v1/providers/{named['id']}"), 403,
                     "permission_denied")


@pytest.mark.parametrize(("dialect", "suffix"), [("anthropic", "/v1"), ("gemini", "/v1beta")])
async def test_a_provider_of_another_dialect_is_called_in_that_dialect(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin, dialect: str, suffix: str) -> None:
    _, key = await _new_tenant(pg)
    base = _fake_url(gateway).removesuffix("/v1") + suffix
    async with _tenant_client(gateway, key) as a, _sdk(gateway, key) as sdk:
        created = await _register(a, name=f"my-{dialect}", type=dialect, base_url=base,
                                  api_key=f"sk-{dialect}-{uuid.uuid4().hex}",
                                  models=[f"{dialect}-own-model"])
        assert created["dialect"] == dialect
        raw = await sdk.chat.completions.with_raw_response.create(
            model=f"{dialect}-own-model", messages=HELLO)  # type: ignore[arg-type]
        assert raw.parse().choices[0].message.content
        assert raw.http_response.json()["metadata"]["provider"] == created["id"]
        assert (await fake.stats())["call_log"][-1]["model"] == f"{dialect}-own-model"


async def test_an_ingress_for_untrusted_tenants_refuses_non_public_base_urls(
        gateway: Gateway, pg: asyncpg.Pool, tmp_path_factory: pytest.TempPathFactory) -> None:
    _, key = await _new_tenant(pg)
    async with ingresses(gateway, tmp_path_factory.mktemp("public-only"),
                         {"SWITCHYARD_INGRESS__PROVIDER_PRIVATE_URLS": "false"}) as [url], \
            _tenant_client(gateway, key) as trusting, _tenant_client_at(url, key) as public:
        for base in (_fake_url(gateway), "http://10.1.2.3/v1", "http://169.254.169.254/v1",
                     "http://localhost:9/v1"):
            for route in ("/v1/providers/register", "/v1/providers/test"):
                assert_error(await public.post(route, json={
                    "name": "inside", "type": "openai-compatible", "base_url": base}),
                    400, "invalid_provider")
        # A registration made elsewhere cannot be pointed inside from here either.
        created = await _register(trusting, name="x", type="openai",
                                  base_url=_fake_url(gateway))
        assert_error(await public.put(f"/v1/providers/{created['id']}", json={
            "base_url": "http://127.0.0.1:1/v1"}), 400, "invalid_provider")


async def test_the_anthropic_sdk_reaches_a_tenants_own_model_and_only_its_tenant(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _new_tenant(pg)
    _, other_key = await _new_tenant(pg)
    async with _tenant_client(gateway, key) as a:
        created = await _register(a, name="acme", type="openai-compatible",
                                  base_url=_fake_url(gateway), models=["acme-llm"])
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key=key, max_retries=0,
                                        timeout=60) as sdk:
        message = await sdk.messages.create(model="acme-llm", max_tokens=50,
                                            messages=[{"role": "user", "content": "hi"}])
        assert message.content[0].type == "text"
        assert (await fake.stats())["call_log"][-1]["model"] == "acme-llm"
    async with anthropic.AsyncAnthropic(base_url=gateway.url, api_key=other_key,
                                        max_retries=0, timeout=60) as other:
        with pytest.raises(anthropic.NotFoundError):
            await other.messages.create(model="acme-llm", max_tokens=50,
                                        messages=[{"role": "user", "content": "hi"}])
    assert created["models"] == ["acme-llm"]


async def test_the_responses_api_reaches_a_tenants_own_model_and_only_its_tenant(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _new_tenant(pg)
    _, other_key = await _new_tenant(pg)
    async with _tenant_client(gateway, key) as a:
        await _register(a, name="acme", type="openai-compatible", base_url=_fake_url(gateway),
                        models=["acme-llm"])
    async with _sdk(gateway, key) as sdk, _sdk(gateway, other_key) as other:
        response = await sdk.responses.create(model="acme-llm", input="hi")
        assert response.output_text
        assert (await fake.stats())["call_log"][-1]["model"] == "acme-llm"
        with pytest.raises(openai.NotFoundError):
            await other.responses.create(model="acme-llm", input="hi")
