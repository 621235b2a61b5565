"""Revocation everywhere within seconds: a revoked key, an expired one or a suspended tenant is
refused by every ingress process at once (the broadcast), by an ingress that missed the
broadcast within its key cache's TTL, the moment its subscription is back; and by the router
for requests published straight to Kafka, answered on the reply topic without a provider
call."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import pytest

from compose.gateway import Gateway
from tests.conftest import FakeAdmin, eventually
from tests.tcp_proxy import TcpProxy
from tests.tenancy_util import (
    CHAT,
    TENANTS,
    Admin,
    Tenant,
    batch,
    client,
    ingresses,
    keys_url,
    new_key,
    new_tenant,
    platform,
    status_of,
)

LONG_TTL_S = 600  # an ingress with this cache refuses a key in seconds only by the broadcast
SHORT_TTL_S = 3


def _ttl(seconds: float) -> dict[str, str]:
    return {"SWITCHYARD_INGRESS__AUTH_CACHE_TTL_S": str(seconds)}


@pytest.fixture(scope="module")
async def platform_admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


@pytest.fixture(scope="module")
async def two_ingresses(gateway: Gateway,
                        tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[str]]:
    """Two more ingress processes whose key caches would hold a key for ten minutes."""
    async with ingresses(gateway, tmp_path_factory.mktemp("ingresses"),
                         _ttl(LONG_TTL_S), _ttl(LONG_TTL_S)) as urls:
        yield urls


@pytest.fixture
async def tenant(platform_admin: Admin) -> Tenant:
    return await new_tenant(platform_admin.http, tier="growth")


async def _models(url: str, api_key: str) -> str:
    """"ok", or the error code GET /v1/models gets (a route that needs no Redis)."""
    async with client(url, api_key) as http:
        response = await http.get("/v1/models")
    if response.status_code == 200:
        return "ok"
    code: str = response.json()["error"]["code"]
    return code


async def _all_say(urls: list[str], api_key: str, expected: str) -> bool:
    return all(await asyncio.gather(*(_says(url, api_key, expected) for url in urls)))


async def _says(url: str, api_key: str, expected: str) -> bool:
    return await _models(url, api_key) == expected


async def test_a_revoked_key_is_refused_by_two_ingress_processes_at_once(
        two_ingresses: list[str], tenant: Tenant, fake: FakeAdmin) -> None:
    first, second = two_ingresses
    async with client(first, tenant.admin_key) as owner:
        key = await new_key(owner, tenant.id)
        for url in two_ingresses:  # each caches the key for ten minutes
            async with client(url, key["key"]) as member:
                assert await status_of(member) == "ok"
        response = await owner.delete(f"{keys_url(tenant.id)}/{key['key_id']}")
        assert response.status_code == 200, response.text
    # Well within the caches' ten minutes: only the broadcast can have told them.
    await eventually(lambda: _all_say(two_ingresses, key["key"], "invalid_api_key"),
                     timeout_s=30)
    async with client(second, key["key"]) as member:
        assert await status_of(member) == "invalid_api_key"


async def test_a_suspension_reaches_two_ingress_processes_at_once_and_so_does_a_resumption(
        two_ingresses: list[str], tenant: Tenant, platform_admin: Admin,
        fake: FakeAdmin) -> None:
    assert await _all_say(two_ingresses, tenant.admin_key, "ok")
    response = await platform_admin.http.post(f"{TENANTS}/{tenant.id}/suspend",
                                              json={"reason": "abuse"})
    assert response.status_code == 200, response.text
    await eventually(lambda: _all_say(two_ingresses, tenant.admin_key, "tenant_suspended"),
                     timeout_s=30)
    response = await platform_admin.http.post(f"{TENANTS}/{tenant.id}/resume")
    assert response.status_code == 200, response.text
    await eventually(lambda: _all_say(two_ingresses, tenant.admin_key, "ok"), timeout_s=30)
    async with client(two_ingresses[0], tenant.admin_key) as owner:
        assert await status_of(owner) == "ok"


async def test_an_ingress_that_misses_the_broadcast_refuses_within_its_ttl_or_once_back(
        gateway: Gateway, tenant: Tenant, tmp_path: Path) -> None:
    """Two ingresses reach Redis through a proxy that is then cut: they hear no broadcast.
    The one with a short key cache refuses a revoked key once its cache expires; the one
    with a long cache still serves it, until its subscription is back and it forgets every
    key it holds."""
    redis_url = urlsplit(gateway.settings.redis.url)
    assert redis_url.hostname is not None
    assert redis_url.port is not None
    proxy = TcpProxy(redis_url.hostname, redis_url.port)
    await proxy.start()
    via_proxy = {"SWITCHYARD_REDIS__URL": f"redis://127.0.0.1:{proxy.port}{redis_url.path}"}
    try:
        async with ingresses(gateway, tmp_path, {**via_proxy, **_ttl(SHORT_TTL_S)},
                             {**via_proxy, **_ttl(LONG_TTL_S)}) as (short, long):
            async with client(gateway.url, tenant.admin_key) as owner:
                key = await new_key(owner, tenant.id)
                assert await _all_say([short, long], key["key"], "ok")
                await proxy.cut()
                response = await owner.delete(f"{keys_url(tenant.id)}/{key['key_id']}")
                assert response.status_code == 200, response.text
            await eventually(lambda: _says(short, key["key"], "invalid_api_key"),
                             timeout_s=30)
            # The revocation was broadcast, and missed: ten minutes of cache left.
            assert await _models(long, key["key"]) == "ok"
            await proxy.start()
            await eventually(lambda: _says(long, key["key"], "invalid_api_key"),
                             timeout_s=30)
    finally:
        await proxy.aclose()


# ------------------------------------------------------------ the Kafka batch path


async def _refused(gateway: Gateway, tenant_id: str, key_id: str, code: str,
                   fake: FakeAdmin) -> bool:
    request_id, frame = await batch(gateway, tenant_id, key_id)
    if frame["kind"] == "done":
        return False
    assert frame["data"]["code"] == code, frame
    assert request_id not in (await fake.stats())["calls_by_request_id"]  # no provider call
    return True


async def test_the_router_refuses_a_revoked_keys_batch_request_on_the_reply_topic(
        gateway: Gateway, tenant: Tenant, fake: FakeAdmin) -> None:
    async with client(gateway.url, tenant.admin_key) as owner:
        key = await new_key(owner, tenant.id)
        _, served = await batch(gateway, tenant.id, key["key_id"])
        assert served["kind"] == "done", served  # the router has the key cached now
        response = await owner.delete(f"{keys_url(tenant.id)}/{key['key_id']}")
        assert response.status_code == 200, response.text
    await eventually(lambda: _refused(gateway, tenant.id, key["key_id"], "key_revoked", fake),
                     timeout_s=30, every_s=0.5)
    _, frame = await batch(gateway, tenant.id, key["key_id"])
    assert (frame["kind"], frame["data"]["status"], frame["data"]["type"]) == (
        "error", 401, "authentication_error")


async def test_the_router_refuses_a_suspended_tenants_batch_request(
        gateway: Gateway, tenant: Tenant, platform_admin: Admin, fake: FakeAdmin) -> None:
    async with client(gateway.url, tenant.admin_key) as owner:
        key = await new_key(owner, tenant.id)
    _, served = await batch(gateway, tenant.id, key["key_id"])
    assert served["kind"] == "done", served
    response = await platform_admin.http.post(f"{TENANTS}/{tenant.id}/suspend")
    assert response.status_code == 200, response.text
    await eventually(lambda: _refused(gateway, tenant.id, key["key_id"], "tenant_suspended",
                                      fake), timeout_s=30, every_s=0.5)
    response = await platform_admin.http.post(f"{TENANTS}/{tenant.id}/resume")
    assert response.status_code == 200, response.text

    async def served_again() -> bool:
        _, frame = await batch(gateway, tenant.id, key["key_id"])
        return bool(frame["kind"] == "done")

    await eventually(served_again, timeout_s=30, every_s=0.5)


async def test_the_router_holds_batch_requests_to_the_keys_role_models_expiry_and_tenant(
        gateway: Gateway, tenant: Tenant, platform_admin: Admin, fake: FakeAdmin) -> None:
    async with client(gateway.url, tenant.admin_key) as owner:
        viewer = await new_key(owner, tenant.id, role="viewer")
        limited = await new_key(owner, tenant.id, allowed_models=["gpt-4o-mini",
                                                                  "claude-haiku"])
        expiring = await new_key(owner, tenant.id)
        response = await owner.post(f"{keys_url(tenant.id)}/{expiring['key_id']}/rotate",
                                    json={"grace_period_s": 0})
        assert response.status_code == 201, response.text

    cases = [(viewer["key_id"], CHAT, 403, "permission_denied"),
             (limited["key_id"], {**CHAT, "model": "gpt-4o"}, 403, "model_not_allowed"),
             (expiring["key_id"], CHAT, 401, "key_expired"),
             ("k_does_not_exist", CHAT, 401, "invalid_api_key")]
    for key_id, body, status, code in cases:
        request_id, frame = await batch(gateway, tenant.id, key_id, body)
        assert frame["kind"] == "error", (code, frame)
        assert (frame["data"]["status"], frame["data"]["code"]) == (status, code)
        assert request_id not in (await fake.stats())["calls_by_request_id"]
    # A key acts for its own tenant only: named with another tenant, it is unknown.
    _, frame = await batch(gateway, platform_admin.tenant_id, limited["key_id"])
    assert (frame["kind"], frame["data"]["code"]) == ("error", "invalid_api_key")

    for _ in range(4):  # "auto" chooses among the key's models
        _, frame = await batch(gateway, tenant.id, limited["key_id"], {**CHAT, "model": "auto"})
        assert frame["kind"] == "done", frame
        assert frame["data"]["metadata"]["model"] in {"gpt-4o-mini", "claude-haiku-4-5"}

