"""Tenants' own provider keys: the HTTP routes, encryption at rest, master key rotation, the
router's cached reader, and that no key ever shows up in a response, the table or a log."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from compose.stack import free_port
from state.keys import create_key
from state.tenancy import Connection
from state.vault import MasterKeys, TenantKeys, put_key, reencrypt_all
from tests.conftest import eventually
from topics.errors import SwitchyardError
from topics.settings import Settings, VaultSettings

KEYS = "/v1/vault/keys"


def nested(depth: int) -> dict[str, Any]:
    config: dict[str, Any] = {"a": 1}
    for _ in range(depth):
        config = {"a": config}
    return config


DEEP = nested(40)  # past any sane config


@dataclass
class Tenant:
    id: str
    http: httpx.AsyncClient


def new_secret() -> str:
    return f"sk-test-{secrets.token_urlsafe(24)}"


def gateway_keys(gateway: Gateway) -> MasterKeys:
    keys = MasterKeys.from_settings(gateway.settings.vault)
    assert keys is not None
    return keys


async def _new_tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    """A tenant of its own per test; deleting it cascades to its stored keys."""
    key_id, api_key = await create_key(pg, f"vault-{uuid.uuid4().hex[:12]}")
    tenant_id: str = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        yield Tenant(tenant_id, http)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


@pytest.fixture
async def tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


@pytest.fixture
async def other_tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    async for made in _new_tenant(pg, gateway):
        yield made


def assert_error(response: httpx.Response, status: int, code: str,
                 param: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    message: str = error["message"]
    return message


async def test_store_list_rotate_delete_over_http(tenant: Tenant, other_tenant: Tenant,
                                                  gateway: Gateway, app_pg: asyncpg.Pool) -> None:
    first, second = new_secret(), new_secret()
    seen: list[str] = []
    stored = await tenant.http.post(KEYS, json={"provider": "openai", "api_key": first,
                                                "config": {"organization": "org-1"}})
    seen.append(stored.text)
    assert stored.status_code == 201, stored.text
    view = stored.json()
    assert view["provider"] == "openai"
    assert view["last4"] == first[-4:]
    assert view["config"] == {"organization": "org-1"}
    assert view["rotated_at"] is None
    # The seed product's key object: RFC 3339 times, and an id of this stored version.
    assert datetime.fromisoformat(view["created_at"]).tzinfo is not None
    assert view["key_id"].startswith("pk_")

    listing = await tenant.http.get(KEYS)
    seen.append(listing.text)
    assert listing.json() == {"object": "list", "data": [view], "keys": [view]}
    assert (await other_tenant.http.get(KEYS)).json()["data"] == []  # tenants are apart
    assert_error(await other_tenant.http.delete(f"{KEYS}/openai"), 404,
                 "provider_key_not_found", "provider")

    rotated = await tenant.http.post(f"{KEYS}/openai/rotate", json={"api_key": second})
    seen.append(rotated.text)
    assert rotated.status_code == 200, rotated.text
    assert rotated.json()["last4"] == second[-4:]
    assert rotated.json()["config"] == {"organization": "org-1"}  # rotation keeps config
    assert datetime.fromisoformat(rotated.json()["rotated_at"]) >= \
        datetime.fromisoformat(view["created_at"])
    assert rotated.json()["key_id"] != view["key_id"]  # a new version of the stored key
    reader = TenantKeys(app_pg, gateway_keys(gateway), ttl_s=0)
    assert await reader.key_for(tenant.id, "openai") == second

    replaced = await tenant.http.post(KEYS, json={"provider": "openai", "api_key": first})
    seen.append(replaced.text)
    assert replaced.status_code == 201
    assert replaced.json()["config"] == {}
    assert await reader.key_for(tenant.id, "openai") == first

    deleted = await tenant.http.delete(f"{KEYS}/openai")
    assert deleted.status_code == 200
    assert deleted.json() == {"provider": "openai", "deleted": True}
    seen.append((await tenant.http.get(KEYS)).text)
    assert (await tenant.http.get(KEYS)).json()["data"] == []
    assert await reader.key_for(tenant.id, "openai") is None

    for body in seen:
        assert first not in body
        assert second not in body
    master = gateway.settings.vault.master_keys.get_secret_value()
    logs = gateway.log_file("ingress").parent
    for log in logs.glob("*.log"):
        text = log.read_text(errors="replace")
        for secret in (first, second, master.partition(":")[2]):
            assert secret not in text, f"a secret is in {log}"
    assert gateway.log_file("ingress").exists()


async def test_a_rotate_without_a_body_reencrypts_under_the_active_master_key(
        tenant: Tenant, pg: asyncpg.Pool, gateway: Gateway) -> None:
    """The seed product's SDKs rotate with no body: the key stays, its ciphertext is new."""
    secret, k1 = new_secret(), gateway_keys(gateway)
    k0 = MasterKeys.generate("k0")  # an older master key, still configured beside k1
    both = MasterKeys.parse(f"{k0},{gateway.settings.vault.master_keys.get_secret_value()}",
                            "k0")
    old = await put_key(pg, both, tenant.id, "anthropic", secret, {"region": "eu"})
    assert old.master_key_id == "k0"

    # A row under a master key the gateway no longer has cannot be re-encrypted by it.
    message = assert_error(await tenant.http.post(f"{KEYS}/anthropic/rotate"), 503,
                           "master_key_not_configured")
    assert "'k0'" in message
    await put_key(pg, k1, tenant.id, "anthropic", secret, {"region": "eu"})
    before = (await tenant.http.get(KEYS)).json()["keys"][0]

    bodies: tuple[dict[str, Any] | None, ...] = (None, {})
    for body in bodies:  # no body at all, and an empty object
        rotated = await tenant.http.post(f"{KEYS}/anthropic/rotate", json=body)
        assert rotated.status_code == 200, rotated.text
        view = rotated.json()
        assert view["key_id"] != before["key_id"]
        assert (view["last4"], view["config"]) == (secret[-4:], {"region": "eu"})
        assert view["created_at"] == before["created_at"]
        assert view["rotated_at"] is not None
        assert await TenantKeys(pg, k1, ttl_s=0).key_for(tenant.id, "anthropic") == secret
        before = view
    assert await pg.fetchval("SELECT master_key_id FROM provider_keys WHERE tenant_id = $1",
                             tenant.id) == "k1"
    assert_error(await tenant.http.post(f"{KEYS}/openai/rotate"), 404,
                 "provider_key_not_found", "provider")


async def test_the_table_holds_no_plaintext(tenant: Tenant, pg: asyncpg.Pool) -> None:
    plain = {p: new_secret() for p in ("openai", "anthropic", "gemini")}
    for provider, secret in plain.items():
        response = await tenant.http.post(KEYS, json={"provider": provider, "api_key": secret})
        assert response.status_code == 201
    rows = await pg.fetch("SELECT * FROM provider_keys")
    dumped = [r[0] for r in await pg.fetch("SELECT t::text FROM provider_keys t")]
    assert len(rows) >= len(plain)
    for secret in plain.values():
        needles = (secret.encode(), secret[4:-4].encode())  # the key or most of it
        for row in rows:
            for value in row.values():
                raw = value if isinstance(value, bytes) else str(value).encode()
                assert not any(n in raw for n in needles)
        assert not any(secret[4:-4] in text for text in dumped)


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(
        tenant: Tenant, other_tenant: Tenant, pg: asyncpg.Pool, gateway: Gateway) -> None:
    keys = gateway_keys(gateway)
    await put_key(pg, keys, tenant.id, "openai", new_secret(), {})
    await put_key(pg, keys, other_tenant.id, "openai", new_secret(), {})
    await put_key(pg, keys, tenant.id, "anthropic", new_secret(), {})
    for target, provider in ((other_tenant.id, "openai"), (tenant.id, "anthropic")):
        await pg.execute(
            "UPDATE provider_keys AS t SET nonce = s.nonce, ciphertext = s.ciphertext"
            " FROM provider_keys AS s WHERE s.tenant_id = $1 AND s.provider = 'openai'"
            " AND t.tenant_id = $2 AND t.provider = $3", tenant.id, target, provider)
        with pytest.raises(SwitchyardError) as failed:
            await TenantKeys(pg, keys, ttl_s=0).key_for(target, provider)
        assert failed.value.code == "vault_decrypt_failed"


async def test_master_key_rotation_with_the_cli_and_reencrypt_all(
        tenant: Tenant, pg: asyncpg.Pool, gateway: Gateway) -> None:
    k1 = gateway.settings.vault.master_keys.get_secret_value()
    k2 = MasterKeys.generate("k2")
    both_k2, only_k2 = MasterKeys.parse(f"{k1},{k2}", "k2"), MasterKeys.parse(k2, "k2")
    plain = {p: new_secret() for p in ("openai", "anthropic")}
    for provider, secret in plain.items():  # under k1: the gateway's active key
        assert (await tenant.http.post(KEYS, json={"provider": provider,
                                                   "api_key": secret})).status_code == 201

    env = {**os.environ, **gateway.settings.to_env(),
           "SWITCHYARD_VAULT__MASTER_KEYS": f"{k1},{k2}", "SWITCHYARD_VAULT__ACTIVE_KEY_ID": "k2"}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compose.cli", "vault", "reencrypt", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out = (await cli.communicate())[0].decode()
    assert cli.returncode == 0, out
    assert "re-encrypted" in out
    assert "no stored key uses any other master key" in out
    assert int(out.split("re-encrypted ")[1].split()[0]) >= len(plain)
    assert k1.partition(":")[2] not in out
    assert k2.partition(":")[2] not in out

    # Everything now decrypts with k2 alone; a second pass has nothing left to do.
    assert await reencrypt_all(pg, both_k2) == 0
    for row in await pg.fetch("SELECT * FROM provider_keys"):
        assert row["master_key_id"] == "k2"
        only_k2.decrypt(row["tenant_id"], row["provider"], row["master_key_id"], row["nonce"],
                        row["ciphertext"])
    reader = TenantKeys(pg, only_k2, ttl_s=0)
    for provider, secret in plain.items():
        assert await reader.key_for(tenant.id, provider) == secret

    # A writer still on the old active key, racing the pass: its row is left alone (it changed
    # since it was read) and moved by the next pass.
    class RacingConnection:
        def __init__(self, conn: Connection) -> None:
            self._conn = conn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

        async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
            if query.startswith("UPDATE"):
                await put_key(pg, MasterKeys.parse(k1, "k1"), tenant.id, "openai", "sk-raced-1",
                              {})
            return await self._conn.fetch(query, *args)

    class RacingPool:
        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[Any]:
            async with pg.acquire() as conn:
                yield RacingConnection(conn)

    await put_key(pg, MasterKeys.parse(k1, "k1"), tenant.id, "gemini", new_secret(), {})
    await put_key(pg, MasterKeys.parse(k1, "k1"), tenant.id, "openai", plain["openai"], {})
    assert await reencrypt_all(cast(asyncpg.Pool, RacingPool()), both_k2) == 1  # gemini only
    assert await reencrypt_all(pg, both_k2) == 1  # the raced openai row
    assert await reader.key_for(tenant.id, "openai") == "sk-raced-1"

    # Rolling back is the same operation: leave every row under the gateway's k1.
    assert await reencrypt_all(pg, MasterKeys.parse(f"{k1},{k2}", "k1"), batch_size=2) >= 3
    assert await pg.fetchval("SELECT count(*) FROM provider_keys WHERE master_key_id <> 'k1'") == 0


async def test_a_row_under_an_unconfigured_master_key_is_a_clear_error(
        tenant: Tenant, pg: asyncpg.Pool) -> None:
    k9 = MasterKeys.generate("k9")
    await put_key(pg, MasterKeys.parse(k9, "k9"), tenant.id, "openai", new_secret(), {})
    try:
        with pytest.raises(SwitchyardError) as failed:
            await TenantKeys(pg, MasterKeys.parse(MasterKeys.generate("k1"), "k1"),
                             ttl_s=0).key_for(tenant.id, "openai")
        assert failed.value.code == "master_key_not_configured"
        assert "'k9'" in failed.value.message
        assert k9[3:] not in failed.value.message
        with pytest.raises(SwitchyardError) as unconfigured:
            await TenantKeys(pg, None, ttl_s=0).key_for(tenant.id, "openai")
        assert unconfigured.value.code == "vault_not_configured"
    finally:
        await pg.execute("DELETE FROM provider_keys WHERE tenant_id = $1", tenant.id)


async def test_tenant_keys_caches_for_its_ttl_and_reads_once(
        tenant: Tenant, app_pg: asyncpg.Pool, gateway: Gateway) -> None:
    keys, now = gateway_keys(gateway), [0.0]
    reads = [0]

    class CountingPool:
        """The router's pool (the application role), counting the connections it lends."""

        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[Connection]:
            reads[0] += 1
            await asyncio.sleep(0.01)  # long enough for every caller to find the read under way
            async with app_pg.acquire() as conn:
                yield conn

    reader = TenantKeys(cast(asyncpg.Pool, CountingPool()), keys, ttl_s=30,
                        clock=lambda: now[0])
    assert await reader.key_for(tenant.id, "openai") is None
    await put_key(app_pg, keys, tenant.id, "openai", "sk-first-key", {})
    assert await reader.key_for(tenant.id, "openai") is None  # the absence is cached too
    now[0] = 31
    got = await asyncio.gather(*(reader.key_for(tenant.id, "openai") for _ in range(20)))
    assert set(got) == {"sk-first-key"}
    assert reads[0] == 2
    await put_key(app_pg, keys, tenant.id, "openai", "sk-second-key", {})
    assert await reader.key_for(tenant.id, "openai") == "sk-first-key"
    reader.invalidate(tenant.id, "openai")
    assert await reader.key_for(tenant.id, "openai") == "sk-second-key"


@pytest.mark.parametrize(("method", "path", "body", "status", "code", "param"), [
    ("POST", KEYS, {"provider": "nope", "api_key": "sk-12345678"}, 400, "unknown_provider",
     "provider"),
    ("POST", KEYS, {"provider": "openai", "api_key": ""}, 422, "invalid_field", "api_key"),
    ("POST", KEYS, {"provider": "openai", "api_key": "sk-1\n2345678"}, 422, "invalid_field",
     "api_key"),
    ("POST", KEYS, {"provider": "openai", "api_key": 12345678}, 422, "invalid_field", "api_key"),
    ("POST", KEYS, {"provider": "openai"}, 422, "missing_field", "api_key"),
    ("POST", KEYS, {"provider": "openai", "api_key": "sk-12345678", "config": [1]}, 422,
     "invalid_field", "config"),
    ("POST", KEYS, {"provider": "openai", "api_key": "sk-12345678", "apikey": "x"}, 422,
     "invalid_field", "apikey"),
    ("POST", KEYS, [1, 2], 400, "invalid_json", None),
    ("POST", f"{KEYS}/openai/rotate", {"api_key": "sk-12345678"}, 404,
     "provider_key_not_found", "provider"),
    ("POST", f"{KEYS}/nope/rotate", {"api_key": "sk-12345678"}, 400, "unknown_provider",
     "provider"),
    ("POST", KEYS, {"provider": "openai", "api_key": "sk-12345678", "config": {"a": "\x00"}},
     422, "invalid_field", "config"),
    ("POST", KEYS, {"provider": "openai", "api_key": "sk-12345678", "config": DEEP}, 422,
     "invalid_field", "config"),
    ("DELETE", f"{KEYS}/openai", None, 404, "provider_key_not_found", "provider"),
    ("DELETE", f"{KEYS}/open%00ai", None, 404, "provider_key_not_found", "provider"),
])
async def test_bad_input_gets_openai_shaped_errors(
        tenant: Tenant, method: str, path: str, body: Any, status: int, code: str,
        param: str | None) -> None:
    response = await tenant.http.request(method, path, json=body)
    message = assert_error(response, status, code, param)
    if code == "unknown_provider":
        assert "'nope'" in message
        assert "openai" in message
    assert "12345678" not in response.text


async def test_no_auth_is_401_on_every_vault_route(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as anonymous:
        for method, path in (("POST", KEYS), ("GET", KEYS), ("POST", f"{KEYS}/openai/rotate"),
                             ("DELETE", f"{KEYS}/openai")):
            assert_error(await anonymous.request(method, path), 401, "missing_api_key")


async def test_without_a_master_key_the_vault_is_503_and_the_rest_runs(
        gateway: Gateway, api_key: str, tmp_path: Path) -> None:
    settings = gateway.settings.model_copy(update={
        "vault": VaultSettings(),
        "ingress": gateway.settings.ingress.model_copy(update={"port": free_port()})})
    ingress = Gateway(settings, tmp_path)
    try:
        ingress.spawn("ingress", "ingress")
        async with httpx.AsyncClient(base_url=ingress.url, timeout=10,
                                     headers={"Authorization": f"Bearer {api_key}"}) as http:
            async def healthy() -> bool:
                try:
                    return (await http.get("/v1/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(healthy, timeout_s=30)
            for method, path in (("POST", KEYS), ("GET", KEYS), ("DELETE", f"{KEYS}/openai")):
                message = assert_error(await http.request(method, path), 503,
                                       "vault_not_configured")
                assert "SWITCHYARD_VAULT__MASTER_KEYS" in message
            assert (await http.get("/v1/models")).status_code == 200
    finally:
        ingress.stop()


async def test_a_malformed_master_key_fails_the_start_without_printing_it(
        gateway: Gateway, tmp_path: Path) -> None:
    material = MasterKeys.generate("k1")[3:-3]  # most of a key: a typo must not leak it
    settings = gateway.settings.model_copy(update={
        "vault": VaultSettings(master_keys=f"k1:{material}", active_key_id="k1"),
        "ingress": gateway.settings.ingress.model_copy(update={"port": free_port()})})
    ingress = Gateway(settings, tmp_path)
    try:
        proc = ingress.spawn("ingress", "ingress")
        assert await asyncio.to_thread(proc.wait, 60) != 0
    finally:
        ingress.stop()
    log = ingress.log_file("ingress").read_text()
    assert "SWITCHYARD_VAULT__MASTER_KEYS" in log
    assert material not in log


def test_master_keys_parse_and_never_print_their_material() -> None:
    k1, k2 = MasterKeys.generate("k1"), MasterKeys.generate("k2")
    hex_key = "k3:" + secrets.token_hex(32)
    keys = MasterKeys.parse(f" {k1} , {k2},{hex_key}", "k3")
    assert keys.ids == ("k1", "k2", "k3")
    assert keys.active_id == "k3"
    for material in (k1[3:], k2[3:], hex_key[3:]):
        assert material not in repr(keys)
    bad = [(f"{k1},{k1}", "k1"), (k1, "k2"), ("k1:" + k1[3:-2], "k1"), ("k1:" + "zz" * 32, "k1"),
           (k1[3:], "k1"), (f"k 1:{k1[3:]}", "k 1")]
    for spec, active in bad:
        with pytest.raises(SwitchyardError) as failed:
            MasterKeys.parse(spec, active)
        assert failed.value.code == "vault_misconfigured"
        assert k1[3:-2] not in failed.value.message
    one, other = keys.encrypt("t", "openai", "sk-same"), keys.encrypt("t", "openai", "sk-same")
    assert one[1] != other[1]
    assert one[2] != other[2]
    assert keys.decrypt("t", "openai", *one) == "sk-same"


async def test_stored_key_and_settings_never_print_secrets(
        tenant: Tenant, pg: asyncpg.Pool, gateway: Gateway, monkeypatch: Any) -> None:
    secret = new_secret()
    stored = await put_key(pg, gateway_keys(gateway), tenant.id, "openai", secret,
                           {"organization": "org-private"})
    assert secret not in repr(stored)
    assert "org-private" not in repr(stored)
    master = gateway.settings.vault.master_keys.get_secret_value()
    assert master[3:] not in repr(gateway.settings)
    assert master[3:] not in str(gateway.settings)
    assert master[3:] not in gateway.settings.model_dump_json()
    # ...yet a child process gets the real value.
    for name, value in gateway.settings.to_env().items():
        monkeypatch.setenv(name, value)
    assert Settings() == gateway.settings


async def test_the_cli_prints_a_usable_new_master_key(gateway: Gateway) -> None:
    env = {**os.environ, **gateway.settings.to_env()}
    cli = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compose.cli", "vault", "new-master-key", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await cli.communicate()
    assert cli.returncode == 0, err
    line = out.decode().strip()
    assert line.startswith("k2:")  # k1 is taken by the gateway's configuration
    assert MasterKeys.parse(line, "k2").ids == ("k2",)
