"""The seed product's SDKs (Go and Rust, plain HTTP + JSON; /work/shared/SEED-API.md), as they
call Switchyard: the requests they send, and the JSON TYPES of the fields they decode.

Those clients fail on a whole response when one field has the wrong JSON type (a string
where a number is decoded, a null where a string is, a fraction where an integer is), so
every route is checked against a table of `path -> JSON type`:

- `SHAPES` maps each seed route (`"METHOD /path"`, the path as `ingress/routes.py` spells
  it) to the fields its clients decode. A path is dotted; `*` is every element of a list
  (which must not be empty); a trailing `?` marks a field that may be absent.
- The types are `J`: `INT` (no fraction: also decodes as a float), `NUM` (any number),
  `STR`, `TIME` (an RFC 3339 string), `BOOL`, `NULL`, `OBJ`, `LIST`; a tuple allows several.
- `decoded(route, response)` asserts the status and every field of the route's line.

To cover a new seed route (auth, audit, admin, …): add its line to `SHAPES`, drive it in a
test with `seed_headers()` and check the response with `decoded`. `test_every_seed_route_is
_served` keeps the table honest: each line must be a route of the gateway.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from enum import Enum
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from ingress.routes import ROUTES
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.tenancy_util import new_platform_admin


class J(Enum):
    INT = "integer"
    NUM = "number"
    STR = "string"
    TIME = "RFC 3339 string"
    BOOL = "boolean"
    NULL = "null"
    OBJ = "object"
    LIST = "array"


INT, NUM, STR, TIME, BOOL, NULL, OBJ, LIST = J

Shape = Mapping[str, J | tuple[J, ...]]

# What an OpenAI chat completion carries, as the seed SDKs decode it, plus the seed's metadata.
_COMPLETION: Shape = {
    "id": STR, "object": STR, "created": INT, "model": STR,
    "choices.*.index": INT, "choices.*.message.role": STR,
    "choices.*.message.content": STR,  # never null: the Rust SDK fails on it
    "choices.*.finish_reason": STR,
    "usage.prompt_tokens": INT, "usage.completion_tokens": INT, "usage.total_tokens": INT,
    "metadata.provider": STR, "metadata.latency_ms": NUM, "metadata.cost_usd": NUM,
    "metadata.cost_usd_exact": STR, "metadata.cache_hit": BOOL,
}
_KEY: Shape = {"provider": STR, "key_id": STR, "created_at": TIME, "rotated_at": (TIME, NULL)}
_SESSION: Shape = {"token": STR, "expires_at": TIME, "tenant_id": STR}
_ERROR: Shape = {"error.message": STR, "error.type": STR, "error.code": (STR, NULL)}
_PROVIDER: Shape = {"id": STR, "name": STR, "type": STR, "models": LIST, "models.*": STR,
                    "enabled": BOOL, "status": STR, "priority": INT, "weight": NUM}


def _each(prefix: str, shape: Shape) -> dict[str, J | tuple[J, ...]]:
    return {f"{prefix}.{path}": want for path, want in shape.items()}


SHAPES: dict[str, Shape] = {
    "POST /v1/infer": _COMPLETION,
    "POST /v1/chat/completions": _COMPLETION,
    "GET /v1/models": {"object": STR, "data.*.id": STR, "data.*.object": STR,
                       "data.*.owned_by": STR, "models.*.id": STR, "models.*.owned_by": STR},
    "GET /v1/health": {"status": STR, "version": STR, "uptime": NUM, "uptime_seconds": NUM},
    "POST /v1/vault/keys": _KEY,
    "GET /v1/vault/keys": {"keys": LIST, **_each("keys.*", _KEY)},
    "POST /v1/vault/keys/{provider}/rotate": _KEY,
    "DELETE /v1/vault/keys/{provider}": {"provider?": STR},  # 204 or a small object
    "GET /v1/usage": {"total_requests": INT, "total_tokens": INT, "total_cost_usd": NUM,
                      "period": STR},
    "GET /v1/usage/history": {"entries": LIST, "period": STR},
    "GET /v1/providers/stats": {},  # any object
    # A tenant's own providers, and the routing preview.
    "POST /v1/providers/register": _PROVIDER,
    "GET /v1/providers": {"providers": LIST, **_each("providers.*", _PROVIDER)},
    "POST /v1/providers/test": {"success": BOOL, "latency_ms": NUM, "error?": STR},
    "PUT /v1/providers/{provider_id}": _PROVIDER,
    "DELETE /v1/providers/{provider_id}": {},  # nothing decoded
    "GET /v1/providers/{provider_id}/health": {"provider_id": STR, "status": STR,
                                               "latency_ms?": NUM, "last_check?": TIME},
    "POST /v1/routing/preview": {
        "selected_provider": STR, "selected_model": STR, "reason": STR, "confidence": NUM,
        "semantic_classification.category": STR, "semantic_classification.confidence": NUM,
        "alternatives": LIST, "estimated_cost_usd": NUM, "estimated_latency_ms": NUM},
    # Identity: a session from an API key; refresh and logout with the JWT as bearer.
    "POST /v1/auth/login": _SESSION,
    "POST /v1/auth/refresh": _SESSION,
    "POST /v1/auth/logout": {},  # 204: nothing decoded
    "GET /v1/audit": {"entries": LIST, "entries.*.id": STR, "entries.*.action": STR,
                      "entries.*.timestamp": TIME, "entries.*.user?": STR,
                      "entries.*.details?": OBJ},
    # The docs' admin API.
    "POST /v1/admin/tenants": {"tenant_id": STR, "name": STR, "tier": STR, "limits": OBJ,
                               "api_keys": LIST, "api_keys.*.key_id": STR,
                               "api_keys.*.key": STR, "api_keys.*.key_preview": STR,
                               "api_keys.*.created_at": TIME},
    "POST /v1/admin/tenants/{tenant_id}/suspend": {"tenant_id": STR, "status": STR},
    "POST /v1/admin/tenants/{tenant_id}/resume": {"tenant_id": STR, "status": STR},
    "POST /v1/tenants/{tenant_id}/api-keys": {"key_id": STR, "key": STR, "key_preview": STR,
                                              "name": STR, "expires_at": (TIME, NULL)},
    "GET /v1/tenants/{tenant_id}/api-keys": {
        "api_keys": LIST, **_each("api_keys.*", {
            "key_id": STR, "key_preview": STR, "name": STR, "created_at": TIME,
            "last_used_at": (TIME, NULL), "expires_at": (TIME, NULL)})},
    "DELETE /v1/tenants/{tenant_id}/api-keys/{key_id}": {},  # 204 or a small object
}

# A streamed answer's last chunk (with `stream_options.include_usage`): the same metadata.
_FINAL_CHUNK: Shape = {
    "object": STR, "usage.prompt_tokens": INT, "usage.completion_tokens": INT,
    "metadata.provider": STR, "metadata.latency_ms": NUM, "metadata.cost_usd": NUM,
    "metadata.cache_hit": BOOL,
}


def json_types(value: object) -> set[J]:
    if value is None:
        return {NULL}
    if isinstance(value, bool):
        return {BOOL}
    if isinstance(value, int):
        return {INT, NUM}
    if isinstance(value, float):
        return {NUM}
    if isinstance(value, str):
        return {STR, TIME} if _is_rfc3339(value) else {STR}
    return {OBJ} if isinstance(value, dict) else {LIST} if isinstance(value, list) else set()


def _is_rfc3339(text: str) -> bool:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return False
    return "T" in text and moment.tzinfo is not None  # a date and time with its offset


def values_at(body: object, path: str) -> list[object]:
    """The values at a dotted path; `*` expands a list, which must not be empty."""
    found = [body]
    for step in path.removesuffix("?").split("."):
        out: list[object] = []
        for value in found:
            if step == "*":
                assert isinstance(value, list), f"{path}: not a list"
                assert value, f"{path}: an empty list, nothing to check"
                out.extend(value)
            elif isinstance(value, dict) and step in value:
                out.append(value[step])
            elif not path.endswith("?"):
                raise AssertionError(f"{path}: missing in {str(value)[:300]}")
        found = out
    return found


def check(body: object, shape: Shape) -> None:
    assert isinstance(body, dict), f"not a JSON object: {str(body)[:300]}"
    for path, want in shape.items():
        allowed = {want} if isinstance(want, J) else set(want)
        for value in values_at(body, path):
            got = json_types(value)
            assert got & allowed, (f"{path}: {value!r} is {sorted(t.value for t in got)}, "
                                   f"the seed SDKs decode {sorted(t.value for t in allowed)}")


def decoded(route: str, response: httpx.Response, status: int = 200) -> dict[str, Any]:
    """The response's JSON, its status and the route's field types checked."""
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    check(body, SHAPES[route])
    return body


# --- a client as the seed SDKs are ---------------------------------------------------------


@dataclass
class SeedClient:
    tenant_id: str
    api_key: str
    http: httpx.AsyncClient

    def headers(self) -> dict[str, str]:
        """What the SDKs send with every call."""
        return {"Authorization": f"Bearer {self.api_key}", "X-Tenant-ID": self.tenant_id,
                "Content-Type": "application/json"}

    async def call(self, method: str, path: str, body: object = None,
                   **params: str) -> httpx.Response:
        # The SDKs marshal the body themselves and send bytes; no body at all when none.
        content = None if body is None else orjson.dumps(body)
        return await self.http.request(method, path, content=content, params=params,
                                       headers=self.headers())


@pytest.fixture
async def seed(gateway: Gateway, pg: asyncpg.Pool) -> AsyncIterator[SeedClient]:
    """A tenant of the test's own, its usage and keys apart from every other test's."""
    key_id, api_key = await create_key(pg, f"seed-{uuid.uuid4().hex[:12]}")
    tenant_id: str = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
        yield SeedClient(tenant_id, api_key, http)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


def seed_request(word: str, **extra: Any) -> dict[str, Any]:
    """An inference body as the SDKs build it: OpenAI's plus `policy` and `metadata`, the
    user's text in `content_parts`."""
    return {"model": "gpt-4o-mini", "max_tokens": 64,
            "messages": [{"role": "system", "content": "be brief"},
                         {"role": "user", "content": "",
                          "content_parts": [{"type": "text", "text": f"{word} from parts"}]}],
            "policy": {"optimize_for": "cost", "fallback_enabled": True, "timeout_ms": 30_000},
            "metadata": {"team": "search", "trace": word}, **extra}


def asked(word: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{word} from parts"}]


# --- the routes ----------------------------------------------------------------------------


@pytest.mark.parametrize(("body", "shape"), [
    ({"metadata": {"cost_usd": "0.000009"}}, {"metadata.cost_usd": NUM}),  # a string
    ({"choices": [{"message": {"content": None}}]}, {"choices.*.message.content": STR}),
    ({"total_requests": 1.0}, {"total_requests": INT}),  # a fraction for an integer
    ({"created_at": "2024-03-01"}, {"created_at": TIME}),  # a date without a time
    ({"created_at": 1709251200}, {"created_at": TIME}),  # unix seconds
    ({"choices": []}, {"choices.*.index": INT}),  # nothing to check is not a pass
    ({}, {"status": STR}),  # missing
])
def test_the_type_check_refuses_what_the_sdks_refuse(body: object, shape: Shape) -> None:
    with pytest.raises(AssertionError):
        check(body, shape)


def test_every_seed_route_is_served() -> None:
    served = {f"{e.method} {e.path}" for e in ROUTES}
    assert set(SHAPES) <= served, set(SHAPES) - served


@pytest.mark.parametrize("route", ["POST /v1/infer", "POST /v1/chat/completions"])
async def test_inference_with_policy_metadata_and_content_parts(
        seed: SeedClient, fake: FakeAdmin, route: str) -> None:
    await fake.configure(tokens=5, prompt_tokens_override=40)
    method, path = route.split()
    body = decoded(route, await seed.call(method, path, seed_request("lima")))
    # content_parts reached the provider as the message's content.
    assert body["choices"][0]["message"]["content"] == expected_content(asked("lima"), 5)
    metadata = body["metadata"]
    assert metadata["provider"] == "openai"
    assert metadata["cache_hit"] is False
    # 40 input tokens at $0.15/M + 5 output tokens at $0.60/M, written with exact digits.
    assert metadata["cost_usd_exact"] == "0.000009"
    assert Decimal(str(metadata["cost_usd"])) == Decimal("0.000009")


@pytest.mark.parametrize("model", ["gpt-4o-mini", "claude-haiku-4-5", "gemini-2.5-flash"])
async def test_a_tool_call_only_answer_has_string_content(seed: SeedClient, fake: FakeAdmin,
                                                          model: str) -> None:
    tools = [{"type": "function", "function": {
        "name": "lookup", "parameters": {"type": "object",
                                         "properties": {"query": {"type": "string"}}}}}]
    response = await seed.call("POST", "/v1/infer", seed_request(
        "mike", model=model, tools=tools, tool_choice="auto", policy={}))
    body = decoded("POST /v1/infer", response)
    message = body["choices"][0]["message"]
    assert message["content"] == ""
    assert message["tool_calls"][0]["function"]["name"] == "lookup"
    assert body["choices"][0]["finish_reason"] == "tool_calls"


async def test_a_streamed_answer_ends_with_the_same_metadata_types(
        seed: SeedClient, fake: FakeAdmin) -> None:
    await fake.configure(tokens=3)
    response = await seed.call("POST", "/v1/chat/completions", seed_request(
        "november", stream=True, stream_options={"include_usage": True}))
    assert response.status_code == 200
    events = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = orjson.loads(events[-2])
    check(final, _FINAL_CHUNK)


async def test_models_have_the_openai_list_and_the_seeds_models(seed: SeedClient) -> None:
    body = decoded("GET /v1/models", await seed.call("GET", "/v1/models"))
    assert body["object"] == "list"
    assert body["models"] == body["data"]


async def test_health_has_version_and_uptime(seed: SeedClient) -> None:
    # No key needed; the SDKs send theirs anyway.
    body = decoded("GET /v1/health", await seed.call("GET", "/v1/health"))
    assert body["status"] == "ok"
    assert body["uptime"] == body["uptime_seconds"] >= 0


async def test_vault_store_list_rotate_with_and_without_a_body_delete(
        seed: SeedClient) -> None:
    stored = decoded("POST /v1/vault/keys", await seed.call(
        "POST", "/v1/vault/keys", {"provider": "mistral", "api_key": "sk-seed-0000aaaa"}), 201)
    assert stored["rotated_at"] is None
    listing = decoded("GET /v1/vault/keys", await seed.call("GET", "/v1/vault/keys"))
    assert [k["key_id"] for k in listing["keys"]] == [stored["key_id"]]

    rotate = "POST /v1/vault/keys/{provider}/rotate"
    bare = decoded(rotate, await seed.call("POST", "/v1/vault/keys/mistral/rotate"))
    assert bare["rotated_at"] is not None
    assert bare["key_id"] != stored["key_id"]
    replaced = decoded(rotate, await seed.call("POST", "/v1/vault/keys/mistral/rotate",
                                               {"api_key": "sk-seed-1111bbbb"}))
    assert replaced["key_id"] not in (stored["key_id"], bare["key_id"])

    deleted = await seed.call("DELETE", "/v1/vault/keys/mistral")
    if deleted.status_code != 204:
        decoded("DELETE /v1/vault/keys/{provider}", deleted)
    assert (await seed.call("GET", "/v1/vault/keys")).json()["keys"] == []


async def test_usage_and_its_history_after_a_request(seed: SeedClient, fake: FakeAdmin) -> None:
    await fake.configure(tokens=5, prompt_tokens_override=40)
    answer = await seed.call("POST", "/v1/infer", seed_request("oscar"))
    assert answer.status_code == 200

    async def recorded() -> dict[str, Any] | None:
        body = decoded("GET /v1/usage", await seed.call("GET", "/v1/usage", period="30d"))
        return body if body["total_requests"] else None

    usage = await eventually(recorded)
    assert (usage["total_requests"], usage["total_tokens"]) == (1, 45)
    assert usage["total_cost_usd"] == answer.json()["metadata"]["cost_usd"]
    assert usage["period"] == "30d"

    history = decoded("GET /v1/usage/history",
                      await seed.call("GET", "/v1/usage/history", period="7d"))
    assert history["period"] == "7d"
    check(history, {"entries.*.date": STR, "entries.*.requests": INT,
                    "entries.*.total_tokens": INT, "entries.*.cost_usd": NUM})
    today = history["entries"][-1]
    check(today, {"models.*.model": STR, "models.*.provider": STR, "models.*.cost_usd": NUM,
                  "providers.*.provider": STR, "providers.*.requests": INT})
    assert today["models"][0]["model"] == "gpt-4o-mini"


async def test_provider_stats_is_an_object(seed: SeedClient) -> None:
    decoded("GET /v1/providers/stats", await seed.call("GET", "/v1/providers/stats"))


async def test_register_list_test_update_health_delete_a_provider_as_the_sdks_do(
        seed: SeedClient, gateway: Gateway, fake: FakeAdmin) -> None:
    assert gateway.settings.fallback_upstream_url is not None
    body = {"name": "own", "type": "openai", "api_key": "sk-seed-own-0000",
            "base_url": gateway.settings.fallback_upstream_url, "models": ["own-model"],
            "priority": 1, "weight": 0.5, "enabled": True}
    tested = decoded("POST /v1/providers/test", await seed.call(
        "POST", "/v1/providers/test", body))
    assert tested["success"] is True
    created = decoded("POST /v1/providers/register",
                      await seed.call("POST", "/v1/providers/register", body), 201)
    listed = decoded("GET /v1/providers", await seed.call("GET", "/v1/providers"))
    assert [p["id"] for p in listed["providers"]] == [created["id"]]
    answer = await seed.call("POST", "/v1/infer", seed_request("own", model="own-model"))
    assert answer.json()["metadata"]["provider"] == created["id"]
    updated = decoded("PUT /v1/providers/{provider_id}", await seed.call(
        "PUT", f"/v1/providers/{created['id']}", {"priority": 2}))
    assert updated["priority"] == 2
    decoded("GET /v1/providers/{provider_id}/health",
            await seed.call("GET", f"/v1/providers/{created['id']}/health"))
    decoded("DELETE /v1/providers/{provider_id}",
            await seed.call("DELETE", f"/v1/providers/{created['id']}"))


async def test_routing_preview_as_the_sdks_decode_it(seed: SeedClient, fake: FakeAdmin) -> None:
    body = {"model": "gpt-4o-mini", "messages": asked("preview"),
            "policy": {"optimize_for": "cost"}}
    preview = decoded("POST /v1/routing/preview",
                      await seed.call("POST", "/v1/routing/preview", body))
    assert preview["selected_model"] == "gpt-4o-mini"


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", "/v1/infer", {"model": "gpt-4o-mini", "messages": []}, 422),
    ("POST", "/v1/infer", {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content_parts": "not a list"}]}, 422),
    ("POST", "/v1/infer", {"model": "gpt-4o-mini", "messages": [
        {"role": "user", "content": "x"}], "policy": {"optimize_for": "vibes"}}, 422),
    ("GET", "/v1/usage/history", None, 400),  # with period=fortnight, below
])
async def test_errors_are_the_documented_envelope(seed: SeedClient, method: str, path: str,
                                                  body: object, status: int) -> None:
    params = {"period": "fortnight"} if path == "/v1/usage/history" else {}
    response = await seed.call(method, path, body, **params)
    assert response.status_code == status, response.text
    check(response.json(), _ERROR)


async def test_a_bad_key_is_401_in_the_envelope(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as http:
        response = await http.get("/v1/usage", headers={"Authorization": "Bearer sy-nope"})
    assert response.status_code == 401
    check(response.json(), _ERROR)


async def test_login_refresh_logout_as_the_sdks_do(seed: SeedClient) -> None:
    opened = decoded("POST /v1/auth/login", await seed.call(
        "POST", "/v1/auth/login", {"api_key": seed.api_key}))
    assert opened["tenant_id"] == seed.tenant_id
    session = SeedClient(seed.tenant_id, opened["token"], seed.http)  # a JWT takes precedence
    decoded("GET /v1/models", await session.call("GET", "/v1/models"))
    renewed = decoded("POST /v1/auth/refresh", await session.call("POST", "/v1/auth/refresh"))
    session = SeedClient(seed.tenant_id, renewed["token"], seed.http)
    assert (await session.call("POST", "/v1/auth/logout")).status_code == 204
    gone = await session.call("GET", "/v1/models")
    assert gone.status_code == 401
    check(gone.json(), _ERROR)


async def test_the_admin_api_and_the_audit_trail_as_the_docs_show_them(
        seed: SeedClient, pg: asyncpg.Pool) -> None:
    platform_tenant, platform_key = await new_platform_admin(pg)
    admin = SeedClient(platform_tenant, platform_key, seed.http)
    created = decoded("POST /v1/admin/tenants", await admin.call(
        "POST", "/v1/admin/tenants", {"name": f"seed-{uuid.uuid4().hex[:8]}", "tier": "trial",
                                      "monthly_budget_usd": 10}), 201)
    tenant_id = created["tenant_id"]
    owner = SeedClient(tenant_id, created["api_keys"][0]["key"], seed.http)

    keys = f"/v1/tenants/{tenant_id}/api-keys"
    made = decoded("POST /v1/tenants/{tenant_id}/api-keys", await owner.call(
        "POST", keys, {"name": "ci", "expires_in_days": 30}), 201)
    listed = decoded("GET /v1/tenants/{tenant_id}/api-keys", await owner.call("GET", keys))
    assert made["key_id"] in [k["key_id"] for k in listed["api_keys"]]
    revoked = await owner.call("DELETE", f"{keys}/{made['key_id']}")
    if revoked.status_code != 204:
        decoded("DELETE /v1/tenants/{tenant_id}/api-keys/{key_id}", revoked)

    suspend = f"/v1/admin/tenants/{tenant_id}/suspend"
    decoded("POST /v1/admin/tenants/{tenant_id}/suspend",
            await admin.call("POST", suspend, {"reason": "unpaid"}))
    decoded("POST /v1/admin/tenants/{tenant_id}/resume",
            await admin.call("POST", f"/v1/admin/tenants/{tenant_id}/resume"))

    expected = {"tenant.created", "key.created", "key.revoked", "tenant.suspended",
                "tenant.resumed"}

    async def trail() -> dict[str, Any] | None:
        # Until the last action's event is written too: five entries can be there before
        # it (the tenant's first key is a `key.created` of its own).
        response = await owner.call("GET", "/v1/audit", limit="50")
        body: dict[str, Any] = response.json()
        return body if response.status_code == 200 and {
            e["action"] for e in body["entries"]} >= expected else None

    entries = (await eventually(trail, timeout_s=30))["entries"]
    check({"entries": entries}, SHAPES["GET /v1/audit"])
    assert {e["action"] for e in entries} >= expected
