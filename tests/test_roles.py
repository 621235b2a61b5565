"""Who may call what. For every route of the table and every role, the answer is 403
`permission_denied` exactly when the role lacks the route's permission: a route added to
`ingress/routes.py` is covered by being there. And no key outranks the key that manages it."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from ingress.call import Endpoint
from ingress.routes import ROUTES
from state.keys import ensure_tenant, new_api_key, store_key
from state.tenancy import platform_scope
from tests.tenancy_util import (
    Admin,
    assert_error,
    client,
    keys_url,
    new_key,
    new_tenant,
    platform,
)
from topics.identity import ROLE_PERMISSIONS, Role


@dataclass
class Caller:
    role: Role
    tenant_id: str
    key_id: str
    http: httpx.AsyncClient


@pytest.fixture(scope="module")
async def callers(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[dict[Role, Caller]]:
    """One key of each role, all of one tenant of their own."""
    made: dict[Role, Caller] = {}
    async with platform_scope(pg) as conn:
        tenant_id = await ensure_tenant(conn, f"roles-{uuid.uuid4().hex[:12]}")
        for role in Role:
            api_key = new_api_key()
            key_id = await store_key(conn, tenant_id, api_key, role=role, name=role.value)
            made[role] = Caller(role, tenant_id, key_id, client(gateway.url, api_key))
    yield made
    for caller in made.values():
        await caller.http.aclose()
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


@pytest.fixture(scope="module")
async def platform_admin(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    async with platform(pg, gateway) as made:
        yield made


def _url(path: str, caller: Caller) -> str:
    # The caller's own tenant (another one would be 404 whatever the role), a key that does
    # not exist (nothing is revoked or rotated), a provider of the catalog.
    return (path.replace("{tenant_id}", caller.tenant_id).replace("{key_id}", "k_absent")
            .replace("{provider}", "openai"))


@pytest.mark.parametrize("endpoint", [e for e in ROUTES if e.permission is not None],
                         ids=lambda e: f"{e.method} {e.path}")
async def test_a_route_refuses_exactly_the_roles_without_its_permission(
        endpoint: Endpoint, callers: dict[Role, Caller]) -> None:
    assert endpoint.permission is not None
    for role, caller in callers.items():
        # An empty object: enough to get past the permission check, and no more (a body a
        # handler would act on is refused as invalid, or acts on the caller's own tenant).
        response = await caller.http.request(endpoint.method, _url(endpoint.path, caller),
                                             json={})
        error = response.json().get("error") if response.status_code >= 400 else None
        denied = response.status_code == 403 and error is not None \
            and error["code"] == "permission_denied"
        allowed = endpoint.permission in ROLE_PERMISSIONS[role]
        assert denied != allowed, (role, response.status_code, response.text)
        if error is not None and denied:
            assert endpoint.permission.value in error["message"]
            assert role.value in error["message"]
        elif response.status_code == 401:
            # Refresh and logout take a session token, not the API key these callers hold.
            assert error is not None
            assert error["code"] == "session_token_required", (role, response.text)


async def test_a_tenant_admin_cannot_create_or_manage_a_key_above_its_own_role(
        callers: dict[Role, Caller]) -> None:
    tenant_admin = callers[Role.TENANT_ADMIN]
    url = keys_url(tenant_admin.tenant_id)
    assert_error(await tenant_admin.http.post(url, json={"name": "up", "role": "platform_admin"}),
                 403, "role_not_grantable")
    platform_key = callers[Role.PLATFORM_ADMIN].key_id
    assert_error(await tenant_admin.http.delete(f"{url}/{platform_key}"), 403,
                 "role_not_grantable")
    assert_error(await tenant_admin.http.post(f"{url}/{platform_key}/rotate"), 403,
                 "role_not_grantable")
    for role in ("tenant_admin", "member", "viewer", "billing"):
        made = await new_key(tenant_admin.http, tenant_admin.tenant_id, role=role)
        assert made["role"] == role


async def test_another_tenants_keys_are_not_found_unless_the_caller_is_a_platform_admin(
        callers: dict[Role, Caller], platform_admin: Admin, gateway: Gateway) -> None:
    other = await new_tenant(platform_admin.http)
    tenant_admin = callers[Role.TENANT_ADMIN].http
    for method, path in (("GET", keys_url(other.id)), ("POST", keys_url(other.id)),
                         ("DELETE", f"{keys_url(other.id)}/k_absent"),
                         ("GET", keys_url("t_does_not_exist"))):
        # The same answer whether the tenant exists or not: nothing leaks.
        assert_error(await tenant_admin.request(method, path, json={"name": "x"}), 404,
                     "tenant_not_found")
    # A platform administrator manages any tenant's keys, but makes no platform_admin there.
    made = await new_key(platform_admin.http, other.id, role="tenant_admin")
    async with client(gateway.url, made["key"]) as theirs:
        listed = (await theirs.get(keys_url(other.id))).json()["api_keys"]
    assert {k["key_id"] for k in listed} == {other.created["api_keys"][0]["key_id"],
                                            made["key_id"]}
    assert_error(await platform_admin.http.post(keys_url(other.id),
                                                json={"name": "x", "role": "platform_admin"}),
                 403, "role_not_grantable")
    assert_error(await platform_admin.http.get(keys_url("t_does_not_exist")), 404,
                 "tenant_not_found")
    own = await new_key(platform_admin.http, platform_admin.tenant_id, role="platform_admin")
    assert own["role"] == "platform_admin"
