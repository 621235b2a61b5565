"""JWT sessions: `POST /v1/auth/login` trades an API key for a session token that is accepted
wherever the key is, with the key's permissions; refresh replaces it, logout ends it on every
ingress, it expires, and its signing keys rotate without downtime.

The session gateway signs with `s1` and also verifies `s2` (tests/conftest.py). Other ingress
processes on the same stack and routers play the rest of a deployment: one already rotated
to sign with `s2`, one with short lifetimes, one from which `s1` is removed."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import time
import uuid
import warnings
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import openai
import pytest
import redis.asyncio as redis
from jwt.warnings import InsecureKeyLengthWarning
from pydantic import SecretStr

from compose.gateway import Gateway
from compose.stack import free_port
from ingress.routes import ROUTES
from state.keys import create_key
from state.revocations import revoked_tokens
from state.sessions import RevokedTokens, revoke
from tests.conftest import FakeAdmin, eventually
from topics.errors import SwitchyardError, Unauthorized
from topics.identity import Principal, Role
from topics.sessions import SessionCodec, SigningKeys
from topics.settings import AuthSettings

LOGIN, REFRESH, LOGOUT = "/v1/auth/login", "/v1/auth/refresh", "/v1/auth/logout"
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}


# ------------------------------------------------------------------------------- helpers

async def _key(pg: asyncpg.Pool, role: Role = Role.MEMBER, *, tenant: str | None = None,
               allowed_models: list[str] | None = None,
               expires_at: datetime | None = None) -> tuple[str, str]:
    """A new key (id, key) of a tenant of its own unless `tenant` is named."""
    key_id, key = await create_key(pg, tenant or f"sessions-{uuid.uuid4().hex[:10]}")
    await pg.execute("UPDATE api_keys SET role = $2, allowed_models = $3, expires_at = $4"
                     " WHERE id = $1", key_id, role.value, allowed_models, expires_at)
    return key_id, key


async def _post(url: str, path: str, *, bearer: str | None = None,
                body: Any = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.post(path, json=body, headers=headers)


async def _get(url: str, path: str, bearer: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        return await http.get(path, headers={"Authorization": f"Bearer {bearer}"})


async def _login(url: str, api_key: str) -> dict[str, Any]:
    response = await _post(url, LOGIN, body={"api_key": api_key})
    assert response.status_code == 200, response.text
    session: dict[str, Any] = response.json()
    return session


def _error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    message: str = error["message"]
    return message


async def _refused(url: str, token: str) -> httpx.Response | None:
    """The answer to the token on `url` if it is refused, else None (to poll on)."""
    response = await _get(url, "/v1/models", token)
    return response if response.status_code != 200 else None


def _secrets(auth: AuthSettings) -> dict[str, bytes]:
    keys = SigningKeys.parse(auth.signing_keys.get_secret_value(), auth.active_signing_key)
    return {key_id: keys.secret(key_id) or b"" for key_id in keys.ids}


@contextlib.asynccontextmanager
async def _ingress(gateway: Gateway, log_dir: Path, *, auth: AuthSettings | None = None,
                   **ingress: Any) -> AsyncIterator[Gateway]:
    """Another ingress process on the session gateway's stack and routers."""
    settings = gateway.settings.model_copy(update={
        "auth": auth if auth is not None else gateway.settings.auth,
        "ingress": gateway.settings.ingress.model_copy(update={"port": free_port(),
                                                               **ingress})})
    extra = Gateway(settings, log_dir)
    try:
        extra.spawn("ingress", "ingress")

        async def healthy() -> bool:
            try:
                async with httpx.AsyncClient(timeout=5) as http:
                    return (await http.get(f"{extra.url}/v1/health")).status_code == 200
            except httpx.TransportError:
                return False

        await eventually(healthy, timeout_s=60)
        yield extra
    finally:
        extra.stop()


@pytest.fixture(scope="module")
async def rotated(gateway: Gateway,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """An ingress already rotated: it signs with s2 and still verifies s1."""
    auth = gateway.settings.auth.model_copy(update={"active_signing_key": "s2"})
    async with _ingress(gateway, tmp_path_factory.mktemp("rotated"), auth=auth) as extra:
        yield extra


@pytest.fixture(scope="module")
async def quick(gateway: Gateway,
                tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    """An ingress with 2 s sessions, no clock leeway, and a key cache of half a second."""
    auth = gateway.settings.auth.model_copy(update={"session_ttl_s": 2, "clock_leeway_s": 0})
    async with _ingress(gateway, tmp_path_factory.mktemp("quick"), auth=auth,
                        auth_cache_ttl_s=0.5) as extra:
        yield extra


# --------------------------------------------------------------------------------- login

async def test_login_trades_an_api_key_for_a_session_in_the_seed_shape(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    key_id, key = await _key(pg, Role.VIEWER)
    before = int(time.time())
    session = await _login(gateway.url, key)

    assert isinstance(session["token"], str)
    assert session["token_type"] == "Bearer"
    assert isinstance(session["expires_in"], int)
    assert session["expires_in"] == 86_400
    expires_at = datetime.fromisoformat(session["expires_at"].replace("Z", "+00:00"))
    assert expires_at.tzinfo is not None
    assert before + 86_400 <= expires_at.timestamp() <= time.time() + 86_400
    assert (session["key_id"], session["role"], session["allowed_models"]) == (
        key_id, "viewer", None)
    tenant_id = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    assert session["tenant_id"] == tenant_id

    header = jwt.get_unverified_header(session["token"])
    assert (header["alg"], header["kid"]) == ("HS256", "s1")
    claims = jwt.decode(session["token"], options={"verify_signature": False})
    assert {k: claims[k] for k in ("iss", "aud", "sub", "tenant_id", "role", "jti")} == {
        "iss": "switchyard", "aud": "switchyard-api", "sub": key_id, "tenant_id": tenant_id,
        "role": "viewer", "jti": session["session_id"]}
    assert claims["exp"] - claims["iat"] == 86_400
    assert "allowed_models" not in claims


async def test_login_refuses_what_is_not_a_usable_api_key(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    url = gateway.url
    _error(await _post(url, LOGIN, body={"api_key": "sy-not-a-key"}), 401, "invalid_api_key")
    _, key = await _key(pg)
    token = (await _login(url, key))["token"]
    # A session token is not an API key: no token begets another without a refresh.
    _error(await _post(url, LOGIN, body={"api_key": token}), 401, "invalid_api_key")
    _, expired = await _key(pg, expires_at=datetime.now(UTC) - timedelta(minutes=1))
    _error(await _post(url, LOGIN, body={"api_key": expired}), 401, "key_expired")

    message = _error(await _post(url, LOGIN, body={"email": "a@example.com",
                                                   "password": "hunter22"}),
                     400, "unsupported_login")
    assert "api_key" in message
    _error(await _post(url, LOGIN, body={}), 422, "missing_field")
    _error(await _post(url, LOGIN, body={"api_key": 42}), 422, "invalid_field")
    _error(await _post(url, LOGIN, body=["sy-x"]), 400, "invalid_json")


async def test_a_session_never_outlives_its_key(gateway: Gateway, pg: asyncpg.Pool) -> None:
    key_expires = datetime.now(UTC) + timedelta(hours=1)
    _, key = await _key(pg, expires_at=key_expires)
    session = await _login(gateway.url, key)
    assert session["expires_in"] <= 3600
    assert datetime.fromisoformat(session["expires_at"]) <= key_expires


# ------------------------------------------------------------------ used like an API key

async def test_the_openai_sdk_works_with_a_session_token(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _key(pg)
    token = (await _login(gateway.url, key))["token"]
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0,
                             timeout=60)
    try:
        completion = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}])
        assert completion.choices[0].message.content
        stream = await sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hello"}], stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
        assert "".join(p or "" for p in pieces)
        models = await sdk.models.list()
        assert any(m.id == "gpt-4o-mini" for m in models.data)
    finally:
        await sdk.close()


def _url(path: str) -> str:
    return path.replace("{provider}", "openai")


# Every authenticated route but the session routes themselves (which refresh or end the token).
# Each request below is harmless for a fresh tenant: an empty body is refused or a no-op.
_ROUTES = [e for e in ROUTES if e.permission is not None and not e.path.startswith("/v1/auth")]


@pytest.mark.parametrize("role", [Role.TENANT_ADMIN, Role.MEMBER, Role.VIEWER, Role.BILLING])
async def test_a_session_has_exactly_its_keys_permissions_on_every_route(
        gateway: Gateway, pg: asyncpg.Pool, role: Role) -> None:
    _, key = await _key(pg, role)
    token = (await _login(gateway.url, key))["token"]
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        for endpoint in _ROUTES:
            answers = []
            for bearer in (key, token):
                response = await http.request(endpoint.method, _url(endpoint.path), json={},
                                              headers={"Authorization": f"Bearer {bearer}"})
                code = response.json()["error"]["code"] if response.status_code >= 400 else None
                answers.append((response.status_code, code))
            assert answers[0] == answers[1], f"{endpoint.method} {endpoint.path}: {answers}"
            assert endpoint.permission is not None
            allowed = Principal("t", "k", role).can(endpoint.permission)
            assert (answers[1][1] == "permission_denied") == (not allowed), endpoint.path


async def test_a_session_of_a_key_limited_to_some_models_is_limited_alike(
        gateway: Gateway, pg: asyncpg.Pool, fake: FakeAdmin) -> None:
    _, key = await _key(pg, allowed_models=["gpt-4o-mini"])
    session = await _login(gateway.url, key)
    assert session["allowed_models"] == ["gpt-4o-mini"]
    claims = jwt.decode(session["token"], options={"verify_signature": False})
    assert claims["allowed_models"] == ["gpt-4o-mini"]
    token = session["token"]
    assert (await _post(gateway.url, "/v1/chat/completions", bearer=token,
                        body=CHAT)).status_code == 200
    _error(await _post(gateway.url, "/v1/chat/completions", bearer=token,
                       body={**CHAT, "model": "gpt-4o"}), 403, "model_not_allowed")


# ------------------------------------------------------------------------ refresh, logout

async def test_refresh_gives_a_new_token_and_ends_the_old_one(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    url = gateway.url
    _, key = await _key(pg)
    old = await _login(url, key)
    response = await _post(url, REFRESH, bearer=old["token"])
    assert response.status_code == 200, response.text
    new = response.json()
    assert set(new) == set(old)
    assert new["token"] != old["token"]
    assert new["session_id"] != old["session_id"]
    assert (new["tenant_id"], new["key_id"], new["role"]) == (
        old["tenant_id"], old["key_id"], old["role"])

    assert (await _get(url, "/v1/models", new["token"])).status_code == 200
    _error(await _get(url, "/v1/models", old["token"]), 401, "token_revoked")
    # A token refreshes once.
    _error(await _post(url, REFRESH, bearer=old["token"]), 401, "token_revoked")


async def test_refresh_and_logout_take_a_session_token_not_an_api_key(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    _, key = await _key(pg)
    for path in (REFRESH, LOGOUT):
        _error(await _post(gateway.url, path, bearer=key), 401, "session_token_required")
        _error(await _post(gateway.url, path), 401, "missing_api_key")
    assert (await _get(gateway.url, "/v1/models", key)).status_code == 200


async def test_logout_ends_the_token_on_every_ingress(
        gateway: Gateway, rotated: Gateway, pg: asyncpg.Pool) -> None:
    _, key = await _key(pg)
    for here, there in ((rotated.url, gateway.url), (gateway.url, rotated.url)):
        token = (await _login(gateway.url, key))["token"]
        for url in (here, there):
            assert (await _get(url, "/v1/models", token)).status_code == 200
        assert (await _post(here, LOGOUT, bearer=token)).status_code == 204
        _error(await _get(here, "/v1/models", token), 401, "token_revoked")
        refused = await eventually(lambda u=there, t=token: _refused(u, t), timeout_s=30)
        _error(refused, 401, "token_revoked")
        _error(await _post(there, LOGOUT, bearer=token), 401, "token_revoked")
    assert (await _get(gateway.url, "/v1/models", key)).status_code == 200


async def test_an_ingress_started_after_a_logout_refuses_the_token(
        gateway: Gateway, pg: asyncpg.Pool, tmp_path: Path) -> None:
    _, key = await _key(pg)
    token = (await _login(gateway.url, key))["token"]
    assert (await _post(gateway.url, LOGOUT, bearer=token)).status_code == 204
    async with _ingress(gateway, tmp_path) as late:
        _error(await _get(late.url, "/v1/models", token), 401, "token_revoked")


async def test_a_revocation_is_stored_until_the_token_expires_and_counts_once(
        r: redis.Redis) -> None:
    jti = uuid.uuid4().hex
    until_s = time.time() + 60
    assert await revoke(r, jti, until_s) is True
    assert await revoke(r, jti, until_s) is False  # a refresh racing another loses
    stored = await revoked_tokens(r)  # what a process loads when it (re)subscribes
    assert 0 < stored[jti] - time.time() * 1000 <= 60_000


def test_revoked_ids_are_forgotten_once_their_tokens_have_expired() -> None:
    revoked = RevokedTokens()
    now_ms = int(time.time() * 1000)
    live = uuid.uuid4().hex
    revoked.add(live, now_ms + 60_000)
    for n in range(2000):  # past tokens: they fail verification anyway
        revoked.add(f"gone-{n}", now_ms - 1)
    assert live in revoked
    assert len(revoked) < 1100  # swept when the set reached 1024 entries


# ---------------------------------------------------------- expiry, the key's own state

async def test_a_session_token_expires(quick: Gateway, pg: asyncpg.Pool) -> None:
    _, key = await _key(pg)
    session = await _login(quick.url, key)
    assert session["expires_in"] == 2
    refused = await eventually(lambda: _refused(quick.url, session["token"]), timeout_s=30)
    message = _error(refused, 401, "token_expired")
    assert "log in again" in message
    _error(await _post(quick.url, REFRESH, bearer=session["token"]), 401, "token_expired")


async def test_a_session_follows_its_key_revoked_lowered_or_suspended(
        gateway: Gateway, quick: Gateway, pg: asyncpg.Pool) -> None:
    """The quick ingress reads a key's record again after half a second; with the revocation
    broadcast, every ingress drops it at once (`Authenticator.drop_key`)."""
    async def refused_with(token: str, status: int, code: str) -> None:
        response = await eventually(lambda: _refused(quick.url, token), timeout_s=30)
        _error(response, status, code)

    key_id, key = await _key(pg, Role.TENANT_ADMIN)
    token = (await _login(gateway.url, key))["token"]  # a 24 h token, used on quick
    assert (await _get(quick.url, "/v1/models", token)).status_code == 200

    # Lowered to viewer: no inference any more (an empty body was a 422 before, now a 403).
    await pg.execute("UPDATE api_keys SET role = 'viewer' WHERE id = $1", key_id)

    async def chat_refused() -> httpx.Response | None:
        response = await _post(quick.url, "/v1/chat/completions", bearer=token, body={})
        return response if response.status_code == 403 else None

    _error(await eventually(chat_refused, timeout_s=30), 403, "permission_denied")
    assert await _ok(quick.url, token)

    tenant_id = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    await pg.execute("UPDATE tenants SET status = 'suspended' WHERE id = $1", tenant_id)
    await refused_with(token, 403, "tenant_suspended")
    await pg.execute("UPDATE tenants SET status = 'active' WHERE id = $1", tenant_id)
    await eventually(lambda: _ok(quick.url, token), timeout_s=30)

    await pg.execute("UPDATE api_keys SET revoked_at = now() WHERE id = $1", key_id)
    await refused_with(token, 401, "key_revoked")
    _error(await _post(quick.url, REFRESH, bearer=token), 401, "key_revoked")


async def _ok(url: str, token: str) -> bool:
    return (await _get(url, "/v1/models", token)).status_code == 200


# ---------------------------------------------------------------------- signing keys

async def test_signing_keys_rotate_without_downtime(
        gateway: Gateway, rotated: Gateway, pg: asyncpg.Pool, tmp_path: Path) -> None:
    _, key = await _key(pg)
    old = (await _login(gateway.url, key))["token"]
    new = (await _login(rotated.url, key))["token"]
    assert jwt.get_unverified_header(old)["kid"] == "s1"
    assert jwt.get_unverified_header(new)["kid"] == "s2"
    for url in (gateway.url, rotated.url):  # during the rotation, both verify everywhere
        for token in (old, new):
            assert (await _get(url, "/v1/models", token)).status_code == 200

    # Once s1 is removed (after the longest session has run out), its tokens are refused.
    s2_only = gateway.settings.auth.model_copy(update={
        "signing_keys": SecretStr(next(e for e in gateway.settings.auth.signing_keys
                                       .get_secret_value().split(",") if e.startswith("s2:"))),
        "active_signing_key": "s2"})
    async with _ingress(gateway, tmp_path, auth=s2_only) as after:
        assert (await _get(after.url, "/v1/models", new)).status_code == 200
        message = _error(await _get(after.url, "/v1/models", old), 401, "invalid_token")
        assert "'s1'" in message
        assert "not configured" in message


def _forged(secret: bytes | None, payload: dict[str, Any], *, algorithm: str = "HS256",
            kid: str | None = "s1") -> str:
    headers = {"kid": kid} if kid is not None else {}
    with warnings.catch_warnings():
        # HS512 with our 32-byte key: PyJWT warns the forger, which is us.
        warnings.simplefilter("ignore", InsecureKeyLengthWarning)
        return jwt.encode(payload, secret, algorithm=algorithm,  # type: ignore[arg-type]
                          headers=headers)


async def test_a_token_that_does_not_verify_is_refused(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    key_id, key = await _key(pg)
    tenant_id = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    s1 = _secrets(gateway.settings.auth)["s1"]
    now = int(time.time())
    good = {"iss": "switchyard", "aud": "switchyard-api", "sub": key_id,
            "tenant_id": tenant_id, "role": "member", "jti": uuid.uuid4().hex,
            "iat": now, "exp": now + 600}
    # The reference point: signed right, it is accepted.
    assert (await _get(gateway.url, "/v1/models", _forged(s1, good))).status_code == 200

    genuine = (await _login(gateway.url, key))["token"]
    head, _, signature = genuine.split(".")
    elevated = base64.urlsafe_b64encode(json.dumps(
        {**jwt.decode(genuine, options={"verify_signature": False}),
         "role": "platform_admin"}).encode()).decode().rstrip("=")
    cases: list[tuple[str, str, str]] = [
        (_forged(os.urandom(32), good), "invalid_token", "signature"),
        (f"{head}.{elevated}.{signature}", "invalid_token", "signature"),
        (_forged(None, good, algorithm="none"), "invalid_token", "algorithm"),
        (_forged(s1, good, algorithm="HS512"), "invalid_token", "algorithm"),
        (_forged(s1, {**good, "aud": "someone-else"}), "invalid_token", "audience"),
        (_forged(s1, {**good, "iss": "someone-else"}), "invalid_token", "issuer"),
        (_forged(s1, {k: v for k, v in good.items() if k != "jti"}), "invalid_token", "jti"),
        (_forged(s1, good, kid="s9"), "invalid_token", "not configured"),
        (_forged(s1, good, kid=None), "invalid_token", "kid"),
        (_forged(s1, {**good, "role": "emperor"}), "invalid_token", "role"),
        (_forged(s1, {**good, "iat": now - 700, "exp": now - 100}), "token_expired", "expired"),
        ("not.a.token", "invalid_token", "malformed"),
    ]
    for token, code, reason in cases:
        response = await _get(gateway.url, "/v1/models", token)
        message = _error(response, 401, code)
        assert reason in message, (reason, message)
        assert token not in response.text


async def test_without_signing_keys_logins_are_503_and_the_rest_runs(
        gateway: Gateway, pg: asyncpg.Pool, tmp_path: Path) -> None:
    _, key = await _key(pg)
    token = (await _login(gateway.url, key))["token"]
    async with _ingress(gateway, tmp_path, auth=AuthSettings()) as bare:
        message = _error(await _post(bare.url, LOGIN, body={"api_key": key}), 503,
                         "sessions_not_configured")
        assert "SWITCHYARD_AUTH__SIGNING_KEYS" in message
        _error(await _get(bare.url, "/v1/models", token), 401, "invalid_token")
        assert (await _get(bare.url, "/v1/models", key)).status_code == 200


async def test_a_malformed_signing_key_fails_the_start_without_printing_it(
        gateway: Gateway, tmp_path: Path) -> None:
    material = SigningKeys.generate("s1")[3:-8]  # most of a key: a typo must not leak it
    settings = gateway.settings.model_copy(update={
        "auth": AuthSettings(signing_keys=f"s1:{material}", active_signing_key="s1"),
        "ingress": gateway.settings.ingress.model_copy(update={"port": free_port()})})
    ingress = Gateway(settings, tmp_path)
    try:
        proc = ingress.spawn("ingress", "ingress")
        assert await asyncio.to_thread(proc.wait, 60) != 0
    finally:
        ingress.stop()
    log = ingress.log_file("ingress").read_text()
    assert "SWITCHYARD_AUTH__SIGNING_KEYS" in log
    assert material not in log


def test_signing_keys_parse_and_never_print_their_material() -> None:
    s1, s2 = SigningKeys.generate("s1"), SigningKeys.generate("s2")
    keys = SigningKeys.parse(f" {s1} , {s2}", "s2")
    assert keys.ids == ("s1", "s2")
    assert keys.active_id == "s2"
    for material in (s1[3:], s2[3:]):
        assert material not in repr(keys)
    bad = [(f"{s1},{s1}", "s1"), (s1, "s2"), ("s1:" + s1[3:-12], "s1"), (s1[3:], "s1"),
           (f"s 1:{s1[3:]}", "s 1"), ("s1:not base64!", "s1")]
    for spec, active in bad:
        with pytest.raises(SwitchyardError) as failed:
            SigningKeys.parse(spec, active)
        assert failed.value.code == "sessions_misconfigured"
        assert s1[3:-12] not in failed.value.message


def test_a_token_signed_on_one_process_verifies_on_another_with_the_same_keys() -> None:
    spec = f"{SigningKeys.generate('s1')},{SigningKeys.generate('s2')}"
    signer = SessionCodec.from_settings(AuthSettings(signing_keys=spec,
                                                     active_signing_key="s2"))
    verifier = SessionCodec.from_settings(AuthSettings(signing_keys=spec,
                                                       active_signing_key="s1"))
    assert signer is not None
    assert verifier is not None
    principal = Principal("t_1", "k_1", Role.BILLING, frozenset({"gpt-4o"}))
    token, issued = signer.issue(principal)
    assert verifier.verify(token) == issued
    other = SessionCodec.from_settings(AuthSettings(
        signing_keys=SigningKeys.generate("s2"), active_signing_key="s2"))
    assert other is not None
    with pytest.raises(Unauthorized) as refused:
        other.verify(token)
    assert refused.value.code == "invalid_token"
    assert SessionCodec.from_settings(AuthSettings()) is None


# ---------------------------------------------------------------- nothing secret leaks

def test_no_signing_key_and_no_token_reaches_the_logs(
        gateway: Gateway, rotated: Gateway, quick: Gateway) -> None:
    """Run after the tests above: everything they did is in these logs."""
    secrets = [entry.partition(":")[2]
               for entry in gateway.settings.auth.signing_keys.get_secret_value().split(",")]
    assert "opened session" in gateway.log_file("ingress").read_text()
    for running in (gateway, rotated, quick):
        log = running.log_file("ingress").read_text()
        for secret in secrets:
            assert secret not in log
        assert "eyJ" not in log  # every JWT starts so: '{"' in base64url


async def test_login_refresh_and_logout_are_in_the_audit_trail_without_the_token(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    _, key = await _key(pg, Role.TENANT_ADMIN)  # it may read the audit trail
    opened = await _login(gateway.url, key)
    refreshed = await _post(gateway.url, REFRESH, bearer=opened["token"])
    assert refreshed.status_code == 200, refreshed.text
    token = refreshed.json()["token"]
    assert (await _post(gateway.url, LOGOUT, bearer=token)).status_code == 204

    async def trail() -> list[dict[str, object]] | None:
        response = await _get(gateway.url, "/v1/audit?action=auth.login", key)
        logins = response.json()["entries"] if response.status_code == 200 else []
        response = await _get(gateway.url, "/v1/audit", key)
        entries = response.json()["entries"] if response.status_code == 200 else []
        return entries if logins and len(entries) >= 3 else None

    entries = list(reversed(await eventually(trail, timeout_s=30)))
    assert [e["action"] for e in entries] == ["auth.login", "auth.refresh", "auth.logout"]
    assert entries[0]["target"] == opened["session_id"]
    assert entries[1]["details"] == {"replaces": opened["session_id"]}
    assert opened["token"] not in str(entries)
    assert token not in str(entries)
