"""Tenants and API keys managed through the admin API, on the real gateway: a platform
administrator creates, lists, suspends and resumes tenants; a tenant administrator creates,
lists, rotates and revokes its keys; the shapes and JSON types are the seed SDKs'."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import (
    CHAT,
    TENANTS,
    Admin,
    Tenant,
    assert_error,
    client,
    keys_url,
    new_key,
    new_tenant,
    platform,
    rfc3339,
    status_of,
)


@pytest.fixture(scope="module")
async def platform_admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


@pytest.fixture
def admin(platform_admin: Admin) -> httpx.AsyncClient:
    """A platform administrator's client."""
    return platform_admin.http


@pytest.fixture
async def tenant(admin: httpx.AsyncClient) -> Tenant:
    return await new_tenant(admin, tier="growth")


@pytest.fixture
async def tenant_admin(gateway: Gateway, tenant: Tenant) -> AsyncIterator[httpx.AsyncClient]:
    async with client(gateway.url, tenant.admin_key) as http:
        yield http


async def test_a_platform_admin_creates_a_tenant_whose_first_key_works(
        admin: httpx.AsyncClient, gateway: Gateway, fake: FakeAdmin) -> None:
    name = f"acme-{uuid.uuid4().hex[:8]}"
    response = await admin.post(TENANTS, json={"name": name, "tier": "growth",
                                               "monthly_budget_usd": 250.5})
    assert response.status_code == 201, response.text
    created = response.json()
    assert isinstance(created["tenant_id"], str)
    assert (created["name"], created["tier"], created["status"]) == (name, "growth", "active")
    rfc3339(created["created_at"])
    assert created["limits"] == {"requests_per_second": 50, "requests_per_minute": 1500,
                                 "burst": 100, "concurrent_requests": 50,
                                 "monthly_budget_usd": 250.5, "budget_hard_cap": False}
    [first] = created["api_keys"]
    assert first["key"].startswith("sy-")
    assert first["key"].startswith(first["key_preview"].removesuffix("..."))
    assert first["role"] == "tenant_admin"
    assert isinstance(first["key_id"], str)
    rfc3339(first["created_at"])

    async with client(gateway.url, first["key"]) as owner:
        assert await status_of(owner) == "ok"
        listed = (await owner.get(keys_url(created["tenant_id"]))).json()["api_keys"]
    assert [k["key_id"] for k in listed] == [first["key_id"]]
    assert "key" not in listed[0]  # shown once, never again

    tenants = (await admin.get(TENANTS)).json()["tenants"]
    assert [t for t in tenants if t["tenant_id"] == created["tenant_id"]] == [
        {k: v for k, v in created.items() if k != "api_keys"}]
    assert_error(await admin.post(TENANTS, json={"name": name}), 409, "tenant_exists")


async def test_a_tenant_takes_its_tiers_limits_and_bad_bodies_are_422(
        admin: httpx.AsyncClient) -> None:
    trial = await new_tenant(admin)  # no tier: trial, the smallest
    assert trial.created["tier"] == "trial"
    assert trial.created["limits"]["monthly_budget_usd"] == 10.0
    assert trial.created["limits"]["budget_hard_cap"] is True
    scale = await new_tenant(admin, tier="scale")
    assert scale.created["limits"]["requests_per_second"] == 1000
    assert scale.created["limits"]["monthly_budget_usd"] is None
    for body, param in (({"name": "x", "tier": "platinum"}, "tier"),
                        ({"name": "x", "monthly_budget_usd": -5}, "monthly_budget_usd"),
                        ({"name": "x", "monthly_budget_usd": True}, "monthly_budget_usd"),
                        ({"name": "x", "monthly_budget_usd": 0.1234567}, "monthly_budget_usd"),
                        ({"name": " "}, "name"), ({"name": "a\nb"}, "name"),
                        ({}, "name"), ({"name": "x", "owner": "me"}, "owner")):
        response = await admin.post(TENANTS, json=body)
        assert response.status_code == 422, (body, response.text)
        assert response.json()["error"]["param"] == param


async def test_keys_are_created_with_a_role_expiry_and_models_and_listed_without_the_key(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    key = await new_key(tenant_admin, tenant.id, name="ci", role="member",
                        expires_in_days=30, allowed_models=["gpt-4o-mini", "claude-haiku"])
    assert set(key) == {"key_id", "key", "key_preview", "name", "role", "created_at",
                        "expires_at", "allowed_models"}
    assert (key["name"], key["role"]) == ("ci", "member")
    assert key["allowed_models"] == ["gpt-4o-mini", "claude-haiku"]
    lifetime = rfc3339(key["expires_at"]) - rfc3339(key["created_at"])
    assert lifetime == timedelta(days=30)

    listed = {k["key_id"]: k for k in (await tenant_admin.get(keys_url(tenant.id))).json()[
        "api_keys"]}
    view = listed[key["key_id"]]
    assert set(view) == {"key_id", "key_preview", "name", "role", "created_at", "last_used_at",
                         "expires_at", "allowed_models", "revoked_at"}
    assert view["last_used_at"] is None
    assert view["revoked_at"] is None
    assert key["key"] not in str(listed)
    default = await new_key(tenant_admin, tenant.id)
    assert (default["role"], default["expires_at"], default["allowed_models"]) == (
        "member", None, None)

    for body, status, param in (
            ({"name": "x", "role": "owner"}, 422, "role"),
            ({"name": "x", "expires_in_days": 0}, 422, "expires_in_days"),
            ({"name": "x", "expires_in_days": "30"}, 422, "expires_in_days"),
            ({"name": "x", "allowed_models": []}, 422, "allowed_models"),
            ({"name": "x", "allowed_models": ["gpt-9"]}, 400, "allowed_models.0")):
        response = await tenant_admin.post(keys_url(tenant.id), json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["param"] == param


async def test_last_used_at_is_written_after_use(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    key = await new_key(tenant_admin, tenant.id)
    async with client(gateway.url, key["key"]) as member:
        assert await status_of(member) == "ok"

    async def last_used() -> str | None:
        listed = (await tenant_admin.get(keys_url(tenant.id))).json()["api_keys"]
        found: str | None = next(k for k in listed if k["key_id"] == key["key_id"])[
            "last_used_at"]
        return found

    used = await eventually(last_used, timeout_s=30, every_s=0.5)
    assert rfc3339(used) >= rfc3339(key["created_at"])


async def test_a_rotated_key_works_through_its_grace_period_and_is_refused_after(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    old = await new_key(tenant_admin, tenant.id, name="deploy", role="member",
                        allowed_models=["gpt-4o-mini"])
    async with client(gateway.url, old["key"]) as before:
        assert await status_of(before) == "ok"  # cached by the ingress from here on
        response = await tenant_admin.post(f"{keys_url(tenant.id)}/{old['key_id']}/rotate",
                                           json={"grace_period_s": 8})
        assert response.status_code == 201, response.text
        new = response.json()
        assert (new["name"], new["role"], new["allowed_models"]) == (
            "deploy", "member", ["gpt-4o-mini"])
        assert new["key"] != old["key"]
        assert new["key_id"] != old["key_id"]
        assert new["rotated_from"]["key_id"] == old["key_id"]
        grace_end = rfc3339(new["rotated_from"]["expires_at"])
        assert grace_end - rfc3339(new["created_at"]) == timedelta(seconds=8)
        # Within the grace period (a route that is only authentication: quick, whatever the
        # load on the box).
        assert (await before.get("/v1/models")).status_code == 200
        async with client(gateway.url, new["key"]) as after:
            assert await status_of(after) == "ok"
        await eventually(lambda: _refused(before, "key_expired"), timeout_s=40, every_s=0.5)


async def test_a_rotation_without_grace_ends_the_old_key_at_once(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    old = await new_key(tenant_admin, tenant.id, expires_in_days=7)
    async with client(gateway.url, old["key"]) as before:
        assert await status_of(before) == "ok"
        response = await tenant_admin.post(f"{keys_url(tenant.id)}/{old['key_id']}/rotate",
                                           json={"grace_period_s": 0})
        assert response.status_code == 201, response.text
        new = response.json()
        # The new key lives as long as the old one was meant to, from now.
        assert rfc3339(new["expires_at"]) - rfc3339(new["created_at"]) == timedelta(days=7)
        await eventually(lambda: _refused(before, "key_expired"), timeout_s=30)
    # No body: the default grace period (an hour).
    response = await tenant_admin.post(f"{keys_url(tenant.id)}/{new['key_id']}/rotate")
    assert response.status_code == 201, response.text
    third = response.json()
    assert rfc3339(third["rotated_from"]["expires_at"]) - rfc3339(third["created_at"]) == \
        timedelta(hours=1)


async def test_a_revoked_key_is_refused_and_listed_as_revoked(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    key = await new_key(tenant_admin, tenant.id)
    url = f"{keys_url(tenant.id)}/{key['key_id']}"
    async with client(gateway.url, key["key"]) as member:
        assert await status_of(member) == "ok"
        response = await tenant_admin.delete(url)
        assert response.status_code == 200, response.text
        revoked = response.json()
        assert (revoked["key_id"], revoked["revoked"]) == (key["key_id"], True)
        rfc3339(revoked["revoked_at"])
        await eventually(lambda: _refused(member, "invalid_api_key"), timeout_s=30)
    again = await tenant_admin.delete(url)  # idempotent: the first revocation's time stays
    assert again.status_code == 200
    assert again.json() == revoked
    listed = (await tenant_admin.get(keys_url(tenant.id))).json()["api_keys"]
    assert next(k for k in listed if k["key_id"] == key["key_id"])["revoked_at"] == \
        revoked["revoked_at"]
    assert_error(await tenant_admin.post(f"{url}/rotate"), 409, "api_key_revoked")
    assert_error(await tenant_admin.delete(f"{keys_url(tenant.id)}/k_absent"), 404,
                 "api_key_not_found")


async def test_a_suspended_tenant_is_refused_until_resumed(
        admin: httpx.AsyncClient, tenant: Tenant, tenant_admin: httpx.AsyncClient,
        fake: FakeAdmin) -> None:
    assert await status_of(tenant_admin) == "ok"
    response = await admin.post(f"{TENANTS}/{tenant.id}/suspend", json={"reason": "unpaid"})
    assert response.status_code == 200, response.text
    suspended = response.json()
    assert (suspended["status"], suspended["suspended_reason"]) == ("suspended", "unpaid")
    rfc3339(suspended["suspended_at"])
    await eventually(lambda: _refused(tenant_admin, "tenant_suspended"), timeout_s=30)
    assert_error(await tenant_admin.get(keys_url(tenant.id)), 403, "tenant_suspended")

    response = await admin.post(f"{TENANTS}/{tenant.id}/resume")
    assert response.status_code == 200, response.text
    assert (response.json()["status"], response.json()["suspended_at"]) == ("active", None)
    await eventually(lambda: _served(tenant_admin), timeout_s=30)


async def test_a_platform_admin_cannot_suspend_its_own_tenant_or_one_that_does_not_exist(
        platform_admin: Admin) -> None:
    admin = platform_admin.http
    assert_error(await admin.post(f"{TENANTS}/{platform_admin.tenant_id}/suspend"), 409,
                 "cannot_suspend_own_tenant")
    assert_error(await admin.post(f"{TENANTS}/t_absent/suspend"), 404, "tenant_not_found")
    assert_error(await admin.post(f"{TENANTS}/t_absent/resume"), 404, "tenant_not_found")


async def test_a_key_limited_to_models_is_refused_others_and_auto_chooses_among_them(
        tenant: Tenant, tenant_admin: httpx.AsyncClient, gateway: Gateway,
        fake: FakeAdmin) -> None:
    allowed = {"gpt-4o-mini", "claude-haiku-4-5"}
    key = await new_key(tenant_admin, tenant.id, allowed_models=["gpt-4o-mini", "claude-haiku"])
    async with client(gateway.url, key["key"]) as limited:
        other = await limited.post("/v1/chat/completions", json={**CHAT, "model": "gpt-4o"})
        assert "gpt-4o" in assert_error(other, 403, "model_not_allowed")
        chain = await limited.post("/v1/chat/completions",
                                   json={**CHAT, "models": ["gpt-4o-mini", "gpt-4o"]})
        assert_error(chain, 403, "model_not_allowed")
        served = set()
        for _ in range(6):
            response = await limited.post("/v1/chat/completions", json={**CHAT, "model": "auto"})
            assert response.status_code == 200, response.text
            served.add(response.json()["metadata"]["model"])
        assert served <= allowed


async def test_the_cli_creates_a_platform_admin_key(gateway: Gateway) -> None:
    name = f"platform-cli-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, **gateway.settings.to_env()}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compose.cli", "admin", "create", "--name", name, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await cli.communicate()
    assert cli.returncode == 0, err
    lines = dict(line.split(": ", 1) for line in out.decode().splitlines())
    tenant_id = lines["platform tenant"].split()[0]
    key = lines["platform admin key (shown once, store it now)"]
    async with client(gateway.url, key) as admin:
        response = await admin.get(TENANTS)
        assert response.status_code == 200, response.text
        assert {"tenant_id": tenant_id, "name": name} in [
            {"tenant_id": t["tenant_id"], "name": t["name"]}
            for t in response.json()["tenants"]]
        listed = (await admin.get(keys_url(tenant_id))).json()["api_keys"]
        assert [(k["key_id"], k["role"]) for k in listed] == [(lines["key id"],
                                                               "platform_admin")]


async def _refused(http: httpx.AsyncClient, code: str) -> bool:
    return await status_of(http) == code


async def _served(http: httpx.AsyncClient) -> bool:
    return await status_of(http) == "ok"


async def test_every_tenant_and_key_action_lands_in_the_tenants_audit_trail(
        platform_admin: Admin, tenant: Tenant, tenant_admin: httpx.AsyncClient) -> None:
    """Created, rotated, revoked, suspended, resumed: each is an entry of the tenant's own
    chain, the platform administrator's actions included, and no entry carries a key."""
    admin = platform_admin.http
    key = await new_key(tenant_admin, tenant.id, name="ci")
    url = f"{keys_url(tenant.id)}/{key['key_id']}"
    rotated = await tenant_admin.post(f"{url}/rotate", json={"grace_period_s": 0})
    assert rotated.status_code == 201, rotated.text
    new_id = rotated.json()["key_id"]
    assert (await tenant_admin.delete(f"{keys_url(tenant.id)}/{new_id}")).status_code == 200
    assert (await admin.post(f"{TENANTS}/{tenant.id}/suspend", json={})).status_code == 200
    assert (await admin.post(f"{TENANTS}/{tenant.id}/resume")).status_code == 200

    expected = ["tenant.created", "key.created", "key.created", "key.rotated", "key.revoked",
                "tenant.suspended", "tenant.resumed"]

    async def trail() -> list[dict[str, object]] | None:
        response = await tenant_admin.get("/v1/audit", params={"limit": 50})
        entries: list[dict[str, object]] = response.json().get("entries", []) \
            if response.status_code == 200 else []
        return entries if len(entries) >= len(expected) else None

    entries = list(reversed(await eventually(trail, timeout_s=30)))  # oldest first
    assert [e["action"] for e in entries] == expected
    by_action = {e["action"]: e for e in entries}
    assert by_action["tenant.suspended"]["user"] == by_action["tenant.created"]["user"] != \
        by_action["key.rotated"]["user"]  # the platform admin, then the tenant's own admin
    assert by_action["key.revoked"]["target"] == new_id
    assert key["key"] not in str(entries)
    assert rotated.json()["key"] not in str(entries)
