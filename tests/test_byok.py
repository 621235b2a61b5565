"""Bring your own key, end to end: a tenant's stored provider key is the one the provider
sees for that tenant's calls, and only for them."""

from __future__ import annotations

import uuid

import asyncpg
import httpx

from compose.gateway import Gateway
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually

HELLO = [{"role": "user", "content": "whose key"}]


async def test_a_tenants_own_key_is_used_for_its_calls_and_only_theirs(
        gateway: Gateway, pg: asyncpg.Pool, http: httpx.AsyncClient, fake: FakeAdmin) -> None:
    _, tenant_api_key = await create_key(pg, f"byok-{uuid.uuid4().hex[:8]}")
    own_provider_key = f"sk-tenant-own-{uuid.uuid4().hex}"
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30, headers={
            "Authorization": f"Bearer {tenant_api_key}"}) as tenant:
        stored = await tenant.post("/v1/vault/keys", json={
            "provider": "openai", "api_key": own_provider_key, "config": {}})
        assert stored.status_code == 201
        assert stored.json()["last4"] == own_provider_key[-4:]

        answer = await tenant.post("/v1/chat/completions",
                                   json={"model": "gpt-4o-mini", "messages": HELLO})
        assert answer.status_code == 200
        assert (await fake.stats())["last_authorization"] == f"Bearer {own_provider_key}"
        assert own_provider_key not in answer.text

        # Another tenant's call on the same provider still uses the gateway's key.
        other = await http.post("/v1/chat/completions",
                                json={"model": "gpt-4o-mini", "messages": HELLO})
        assert other.status_code == 200
        assert (await fake.stats())["last_authorization"] == "Bearer env-key-openai"

        # Deleted: after the routers' short cache expires, the gateway's key serves it again.
        assert (await tenant.delete("/v1/vault/keys/openai")).status_code == 200

        async def back_to_gateway_key() -> bool:
            await tenant.post("/v1/chat/completions",
                              json={"model": "gpt-4o-mini", "messages": HELLO})
            return bool((await fake.stats())["last_authorization"] == "Bearer env-key-openai")

        await eventually(back_to_gateway_key, timeout_s=10, every_s=0.3)

    for name in gateway.processes:
        assert own_provider_key not in gateway.log_file(name).read_text(errors="replace")
