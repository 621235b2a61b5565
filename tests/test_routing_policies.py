"""Tenants' routing policies: the HTTP routes against the real gateway and PostgreSQL, the
validation of shapes and names, the eligibility rules, and the router's cached reader."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, cast

import asyncpg
import httpx
import pytest
from pydantic import ValidationError

from compose.gateway import Gateway
from state.keys import create_key
from state.routing_policy import PolicyCache, delete_policy, get_policy, put_policy
from state.tenancy import Connection
from topics.catalog import Catalog, load_catalog
from topics.errors import SwitchyardError
from topics.routing_policy import (
    CATEGORIES,
    RoutingPolicy,
    eligible_routes,
    pin_category,
    route_tiers,
    unit_price,
    validate_against,
)
from topics.settings import Settings

POLICY = "/v1/routing/policy"


@dataclass
class Tenant:
    id: str
    http: httpx.AsyncClient


@pytest.fixture
async def tenant(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Tenant]:
    """A tenant of its own per test; deleting it cascades to its policy."""
    key_id, api_key = await create_key(pg, f"policy-{uuid.uuid4().hex[:12]}")
    tenant_id: str = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {api_key}"}) as http:
        yield Tenant(tenant_id, http)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


@pytest.fixture(scope="module")
def catalog() -> Catalog:
    return load_catalog(Settings().catalog_path)


def assert_error(response: httpx.Response, status: int, code: str, param: str | None) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert (error["code"], error["param"]) == (code, param), error
    message: str = error["message"]
    return message


DEFAULT = {
    "weights": {"cost": 1.0, "latency": 1.0, "quality": 1.0},
    "allowed_providers": None, "allowed_models": None, "price_ceiling_per_mtok": None,
    "pinned_routes": {}, "pin_min_confidence": 0.5, "default_mode": "auto",
    "allow_substitution": False, "judge_model": None, "council_output": "winner", "fallbacks": {},
    "cache": {"enabled": False, "ttl_s": None, "allow_nondeterministic": False},
}


async def test_put_get_delete_round_trip(tenant: Tenant, pg: asyncpg.Pool,
                                         http: httpx.AsyncClient) -> None:
    got = await tenant.http.get(POLICY)
    assert got.status_code == 200, got.text
    assert got.json() == {"object": "routing.policy", "source": "default", "updated_at": None,
                          "policy": DEFAULT}

    policy = {
        "weights": {"cost": 2, "latency": 0.5, "quality": 0},
        "allowed_providers": ["openai", "anthropic", "mistral"],
        "allowed_models": ["gpt-4o-mini", "claude-sonnet", "codestral-latest", "gpt-4.1"],
        "price_ceiling_per_mtok": 15,
        "pinned_routes": {"code": "codestral-latest", "summarization": "gpt-4o-mini"},
        "pin_min_confidence": 0.7,
        "default_mode": "speculative",
        "allow_substitution": True,
        "judge_model": "gpt-4o-mini",
        "council_output": "synthesis",
        "fallbacks": {"gpt-4o-mini": ["claude-sonnet", "codestral-latest"]},
        "cache": {"enabled": True, "ttl_s": 600, "allow_nondeterministic": False},
    }
    # gpt-4.1 is not in the catalog: refused, and nothing is stored.
    assert_error(await tenant.http.put(POLICY, json=policy), 400, "unknown_model",
                 "allowed_models.3")
    assert (await tenant.http.get(POLICY)).json()["source"] == "default"

    policy["allowed_models"] = ["gpt-4o-mini", "claude-sonnet", "codestral-latest"]
    put = await tenant.http.put(POLICY, json=policy)
    assert put.status_code == 200, put.text
    stored = put.json()
    assert stored["source"] == "stored"
    assert isinstance(stored["updated_at"], int)
    expected = {**policy, "weights": {"cost": 2.0, "latency": 0.5, "quality": 0.0},
                "price_ceiling_per_mtok": "15"}  # money comes back as a decimal string
    assert stored["policy"] == expected
    assert (await tenant.http.get(POLICY)).json() == stored
    assert (await http.get(POLICY)).json()["source"] == "default"  # tenants are apart
    assert await pg.fetchval("SELECT count(*) FROM routing_policies WHERE tenant_id = $1",
                             tenant.id) == 1
    assert (await get_policy(pg, tenant.id)).price_ceiling_per_mtok == Decimal(15)

    # PUT replaces the whole policy: what is left out is back to its default.
    put = await tenant.http.put(POLICY, json={"price_ceiling_per_mtok": "2.50"})
    assert put.json()["policy"] == {**DEFAULT, "price_ceiling_per_mtok": "2.50"}

    deleted = await tenant.http.delete(POLICY)
    assert deleted.status_code == 200
    assert deleted.json() == {"object": "routing.policy", "source": "default",
                              "updated_at": None, "policy": DEFAULT, "deleted": True}
    again = await tenant.http.delete(POLICY)  # idempotent
    assert again.status_code == 200
    assert again.json()["deleted"] is False
    assert (await tenant.http.get(POLICY)).json()["source"] == "default"
    assert await get_policy(pg, tenant.id) == RoutingPolicy()


async def test_a_stored_policy_that_no_longer_validates_is_an_error_not_the_default(
        tenant: Tenant, pg: asyncpg.Pool) -> None:
    await pg.execute("INSERT INTO routing_policies (tenant_id, policy) VALUES ($1, $2::jsonb)",
                     tenant.id, '{"allowed_providers": ["openai"], "retired_field": 1}')
    with pytest.raises(SwitchyardError) as failed:
        await get_policy(pg, tenant.id)
    assert failed.value.code == "routing_policy_unreadable"
    assert_error(await tenant.http.get(POLICY), 500, "routing_policy_unreadable", None)
    # The tenant can still replace it.
    assert (await tenant.http.put(POLICY, json={})).status_code == 200
    assert await get_policy(pg, tenant.id) == RoutingPolicy()


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    # names the catalog does not have, or a policy at odds with itself: 400
    ({"allowed_providers": ["openai", "nope"]}, 400, "unknown_provider", "allowed_providers.1"),
    ({"allowed_models": ["gpt-4o", "gpt-9"]}, 400, "unknown_model", "allowed_models.1"),
    ({"pinned_routes": {"code": "gpt-9"}}, 400, "unknown_model", "pinned_routes.code"),
    ({"pinned_routes": {"summarization": "text-embedding-3-small"}}, 400, "policy_conflict",
     "pinned_routes.summarization"),
    ({"allowed_providers": ["anthropic"], "pinned_routes": {"code": "gpt-4o"}}, 400,
     "policy_conflict", "pinned_routes.code"),
    ({"allowed_models": ["gpt-4o-mini"], "pinned_routes": {"math": "gpt-4o"}}, 400,
     "policy_conflict", "pinned_routes.math"),
    ({"price_ceiling_per_mtok": 1, "pinned_routes": {"code": "gpt-5.5"}}, 400,
     "policy_conflict", "pinned_routes.code"),
    ({"allowed_providers": ["anthropic"], "allowed_models": ["gpt-4o"]}, 400,
     "policy_conflict", "allowed_models"),
    # malformed shapes: 422 naming the field
    ({"weights": {"cost": "1"}}, 422, "invalid_field", "weights.cost"),
    ({"weights": {"cost": -1}}, 422, "invalid_field", "weights.cost"),
    ({"weights": {"cost": 0, "latency": 0, "quality": 0}}, 422, "invalid_field", "weights"),
    ({"weights": {"speed": 1}}, 422, "invalid_field", "weights.speed"),
    ({"weights": [1, 1, 1]}, 422, "invalid_field", "weights"),
    ({"allowed_providers": "openai"}, 422, "invalid_field", "allowed_providers"),
    ({"allowed_providers": []}, 422, "invalid_field", "allowed_providers"),
    ({"allowed_providers": ["openai", "openai"]}, 422, "invalid_field", "allowed_providers"),
    ({"allowed_models": ["gpt-4o", 4]}, 422, "invalid_field", "allowed_models.1"),
    ({"allow_substitution": 1}, 422, "invalid_field", "allow_substitution"),
    ({"allow_substitution": "true"}, 422, "invalid_field", "allow_substitution"),
    ({"mode": "auto"}, 422, "invalid_field", "mode"),
    ({"pinned_routes": {"poetry": "gpt-4o"}}, 422, "invalid_field", "pinned_routes.poetry"),
    ({"pinned_routes": {"code": 3}}, 422, "invalid_field", "pinned_routes.code"),
    ({"default_mode": "fastest"}, 422, "invalid_field", "default_mode"),
    ({"price_ceiling_per_mtok": 0}, 422, "invalid_field", "price_ceiling_per_mtok"),
    ({"price_ceiling_per_mtok": -2}, 422, "invalid_field", "price_ceiling_per_mtok"),
    ({"price_ceiling_per_mtok": "cheap"}, 422, "invalid_field", "price_ceiling_per_mtok"),
    ({"price_ceiling_per_mtok": True}, 422, "invalid_field", "price_ceiling_per_mtok"),
    ([1, 2], 400, "invalid_json", None),
])
async def test_bad_policies_get_clear_errors(tenant: Tenant, body: Any, status: int, code: str,
                                             param: str | None) -> None:
    message = assert_error(await tenant.http.put(POLICY, json=body), status, code, param)
    if param is not None:
        assert message.startswith(f"{param}:") or code == "policy_conflict", message
    if code == "unknown_provider":
        assert "'nope'" in message
        assert "anthropic" in message  # says what would have been right
    if param in ("mode", "weights.speed"):
        assert "unknown field" in message
    assert (await tenant.http.get(POLICY)).json()["source"] == "default"


async def test_no_auth_is_401_on_every_policy_route(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30) as anonymous:
        for method in ("GET", "PUT", "DELETE"):
            assert_error(await anonymous.request(method, POLICY), 401, "missing_api_key", None)


# ------------------------------------------------------------------------- eligibility


def ids(models: Sequence[Any]) -> list[str]:
    return [m.id for m in models]


def test_auto_with_a_pin_is_the_pinned_route_only(catalog: Catalog) -> None:
    policy = RoutingPolicy(pinned_routes={"code": "claude-sonnet"})  # an alias works too
    assert ids(eligible_routes(catalog, policy, category="code",
                               requested_model="auto")) == ["claude-sonnet-4-6"]
    # Another category, or none, is the router's choice among every chat model.
    chat = [m.id for m in catalog.models if m.kind == "chat"]
    for category in ("math", None, "not-a-category"):
        assert ids(eligible_routes(catalog, policy, category=category,
                                   requested_model="auto")) == chat


def test_auto_without_a_pin_is_every_eligible_chat_model(catalog: Catalog) -> None:
    routes = eligible_routes(catalog, RoutingPolicy(), category="code", requested_model="auto")
    assert routes
    assert all(m.kind == "chat" for m in routes)
    assert len(routes) == sum(m.kind == "chat" for m in catalog.models)
    assert set(CATEGORIES) >= {"code", "math", "brainstorming"}


def test_allowed_providers_and_models_filter(catalog: Catalog) -> None:
    policy = RoutingPolicy(allowed_providers=("anthropic", "mistral"))
    routes = eligible_routes(catalog, policy, category=None, requested_model="auto")
    assert {m.provider for m in routes} == {"anthropic", "mistral"}
    assert len(routes) == 6
    narrower = RoutingPolicy(allowed_providers=("anthropic", "mistral"),
                             allowed_models=("claude-haiku", "codestral", "gpt-4o"))
    assert ids(eligible_routes(catalog, narrower, category=None, requested_model="auto")) == [
        "claude-haiku-4-5", "codestral-latest"]


def test_the_price_ceiling_compares_the_larger_of_input_and_output(catalog: Catalog) -> None:
    ceiling = Decimal("1.60")
    policy = RoutingPolicy(price_ceiling_per_mtok=ceiling)
    routes = eligible_routes(catalog, policy, category=None, requested_model="auto")
    assert routes
    assert all(max(m.input_per_mtok, m.output_per_mtok) <= ceiling for m in routes)
    got = ids(routes)
    assert "gpt-4.1-mini" in got  # output exactly 1.60: the ceiling is inclusive
    assert "gpt-4o-mini" in got  # 0.15 in, 0.60 out
    assert "deepseek-chat" not in got  # 0.56 in is under, 1.68 out is over
    assert "qwen-max" not in got  # input 1.60 is at the ceiling, output 6.40 above
    assert unit_price(catalog.model("qwen-max")) == Decimal("6.40")  # type: ignore[arg-type]
    excluded = {m.id for m in catalog.models if m.kind == "chat"} - set(got)
    assert all(unit_price(m) > ceiling for m in catalog.models if m.id in excluded)


def test_a_named_model_without_and_with_substitution(catalog: Catalog) -> None:
    plain = RoutingPolicy()
    assert ids(eligible_routes(catalog, plain, category="code",
                               requested_model="gpt-4o")) == ["gpt-4o"]
    assert ids(eligible_routes(catalog, plain, category=None,
                               requested_model="claude-opus")) == ["claude-opus-4-6"]
    swap = RoutingPolicy(allow_substitution=True, allowed_providers=("openai", "mistral"))
    routes = eligible_routes(catalog, swap, category=None, requested_model="gpt-4o")
    assert ids(routes) == ["gpt-4o", "gpt-5.5", "gpt-5.4", "mistral-large-latest"]
    assert {m.class_ for m in routes} == {"frontier"}
    # Not eligible itself, but its class has eligible members: those serve it.
    routes = eligible_routes(catalog, swap, category=None, requested_model="claude-opus")
    assert ids(routes) == ["gpt-5.5", "gpt-5.4", "gpt-4o", "mistral-large-latest"]
    # Embeddings models are never substituted, but the policy still applies to them.
    emb = RoutingPolicy(allow_substitution=True)
    assert ids(eligible_routes(catalog, emb, category=None,
                               requested_model="text-embedding-3-small")) == [
        "text-embedding-3-small"]


def test_a_named_model_comes_first_then_its_fallbacks_then_its_class(
        catalog: Catalog) -> None:
    """Tiers are tried in order; the router ranks only within a tier."""
    policy = RoutingPolicy(allow_substitution=True, allowed_providers=("openai", "mistral"),
                           fallbacks={"gpt-4o": ("mistral-large-latest", "gpt-4o-mini")})
    assert [ids(t) for t in route_tiers(catalog, policy, category=None,
                                        requested_model="gpt-4o")] == [
        ["gpt-4o"], ["mistral-large-latest"], ["gpt-4o-mini"], ["gpt-5.5", "gpt-5.4"]]
    # The request's own chain takes the place of the policy's; the named model stays first.
    assert [ids(t) for t in route_tiers(catalog, policy, category=None,
                                        requested_model="gpt-4o",
                                        fallbacks=("gpt-5.4",))] == [
        ["gpt-4o"], ["gpt-5.4"], ["gpt-5.5", "mistral-large-latest"]]
    # A fallback the policy excludes is skipped, not refused.
    narrow = RoutingPolicy(allowed_providers=("openai",),
                           fallbacks={"gpt-4o": ("mistral-large-latest", "gpt-4o-mini")})
    assert ids(eligible_routes(catalog, narrow, category=None, requested_model="gpt-4o")) == [
        "gpt-4o", "gpt-4o-mini"]
    # A policy's chain names the model as it likes (an alias): the request's name finds it.
    aliased = RoutingPolicy(fallbacks={"claude-opus": ("gpt-4o",)})
    assert ids(eligible_routes(catalog, aliased, category=None,
                               requested_model="claude-opus-4-6")) == [
        "claude-opus-4-6", "gpt-4o"]


def test_an_unsure_label_pins_nothing(catalog: Catalog) -> None:
    """A pin serves its category only when the classifier was sure enough of the label; a
    client's hint (no confidence) always pins; an unsure label is routed as `general`."""
    policy = RoutingPolicy(pinned_routes={"code": "claude-sonnet-4-6"}, pin_min_confidence=0.6)
    assert pin_category(policy, "code", 0.6) == "code"
    assert pin_category(policy, "code", None) == "code"
    assert pin_category(policy, "code", 0.59) is None
    assert pin_category(policy, None, 0.99) is None
    sure = route_tiers(catalog, policy, category=pin_category(policy, "code", 0.9),
                       requested_model="auto")
    unsure = route_tiers(catalog, policy, category=pin_category(policy, "code", 0.41),
                         requested_model="auto")
    assert [ids(t) for t in sure] == [["claude-sonnet-4-6"]]
    assert len(unsure) == 1
    assert len(unsure[0]) > 1
    assert RoutingPolicy().pin_min_confidence == 0.5
    for bad in (1.5, -0.1, "0.7", True):
        with pytest.raises(ValidationError):
            RoutingPolicy(pin_min_confidence=bad)


def test_one_models_routes_at_several_providers(catalog: Catalog) -> None:
    groq, together = "groq/llama-3.3-70b-versatile", "together/llama-3.3-70b-instruct-turbo"
    plain = RoutingPolicy()
    # Its shared name: one tier, the router load-balances.
    assert [ids(t) for t in route_tiers(catalog, plain, category=None,
                                        requested_model="llama-3.3-70b")] == [[groq, together]]
    # A route's own id: that route, then the other provider's.
    assert [ids(t) for t in route_tiers(catalog, plain, category=None,
                                        requested_model=together)] == [[together], [groq]]
    only_groq = RoutingPolicy(allowed_providers=("groq",))
    assert ids(eligible_routes(catalog, only_groq, category=None,
                               requested_model="llama-3.3-70b")) == [groq]


def test_fallbacks_in_a_policy_are_checked_against_the_catalog(catalog: Catalog) -> None:
    validate_against(RoutingPolicy(fallbacks={"gpt-4o": ("claude-opus",)}), catalog)
    for fallbacks, code, param in [
        ({"gpt-9": ("gpt-4o",)}, "unknown_model", "fallbacks.gpt-9"),
        ({"gpt-4o": ("gpt-9",)}, "unknown_model", "fallbacks.gpt-4o.0"),
        ({"gpt-4o": ("gpt-4o-mini", "text-embedding-3-small")}, "wrong_model_kind",
         "fallbacks.gpt-4o.1"),
    ]:
        with pytest.raises(SwitchyardError) as refused:
            validate_against(RoutingPolicy(fallbacks=fallbacks), catalog)
        assert (refused.value.code, refused.value.param) == (code, param)


def test_a_named_model_outside_the_policy_is_a_clear_403(catalog: Catalog) -> None:
    policy = RoutingPolicy(allowed_providers=("anthropic",))
    with pytest.raises(SwitchyardError) as refused:
        eligible_routes(catalog, policy, category=None, requested_model="gpt-4o")
    assert (refused.value.status, refused.value.code, refused.value.param) == (
        403, "model_not_allowed", "model")
    assert "allowed_providers" in refused.value.message
    assert "allow_substitution is off" in refused.value.message
    # With substitution but no eligible model of the class (anthropic has no reasoning one).
    swap = RoutingPolicy(allowed_providers=("anthropic",), allow_substitution=True)
    with pytest.raises(SwitchyardError) as none_left:
        eligible_routes(catalog, swap, category=None, requested_model="gemini-2.5-pro")
    assert none_left.value.code == "model_not_allowed"
    assert "no other reasoning model" in none_left.value.message
    cheap = RoutingPolicy(price_ceiling_per_mtok=Decimal(1))
    with pytest.raises(SwitchyardError) as too_dear:
        eligible_routes(catalog, cheap, category=None, requested_model="gpt-5.5")
    assert "price_ceiling_per_mtok" in too_dear.value.message
    with pytest.raises(SwitchyardError) as unknown:
        eligible_routes(catalog, RoutingPolicy(), category=None, requested_model="gpt-9")
    assert (unknown.value.status, unknown.value.code) == (404, "model_not_found")


def test_a_pin_the_catalog_no_longer_allows_falls_back_and_nothing_left_is_403(
        catalog: Catalog) -> None:
    # Stored before the catalog changed: validate_against would refuse it today.
    stale = RoutingPolicy(allowed_models=("gpt-4o-mini", "retired-model"),
                          pinned_routes={"code": "retired-model"})
    with pytest.raises(SwitchyardError):
        validate_against(stale, catalog)
    assert ids(eligible_routes(catalog, stale, category="code",
                               requested_model="auto")) == ["gpt-4o-mini"]
    gone = RoutingPolicy(allowed_models=("retired-model",))
    with pytest.raises(SwitchyardError) as empty:
        eligible_routes(catalog, gone, category="code", requested_model="auto")
    assert (empty.value.status, empty.value.code) == (403, "no_eligible_route")


def test_the_model_refuses_what_no_policy_may_say() -> None:
    with pytest.raises(ValidationError):
        RoutingPolicy.model_validate({"weights": {"cost": 0, "latency": 0, "quality": 0}})
    with pytest.raises(ValidationError):
        RoutingPolicy.model_validate({"weights": {"cost": float("inf")}})
    policy = RoutingPolicy()
    with pytest.raises(ValidationError):
        policy.allow_substitution = True  # type: ignore[misc]
    assert RoutingPolicy.model_validate(policy.public()) == policy


# ------------------------------------------------------------------------- the cached reader


async def test_policy_cache_serves_within_its_ttl_and_rereads_after(
        tenant: Tenant, app_pg: asyncpg.Pool) -> None:
    now = [0.0]
    reads = [0]

    class CountingPool:
        """The router's pool (the application role), counting the connections it lends."""

        @contextlib.asynccontextmanager
        async def acquire(self) -> AsyncIterator[Connection]:
            reads[0] += 1
            await asyncio.sleep(0.01)  # long enough for every caller to find the read under way
            async with app_pg.acquire() as conn:
                yield conn

    cache = PolicyCache(cast(asyncpg.Pool, CountingPool()), 5.0, clock=lambda: now[0])
    got = await asyncio.gather(*(cache.policy_for(tenant.id) for _ in range(20)))
    assert all(p == RoutingPolicy() for p in got)  # concurrent misses share one read
    assert reads[0] == 1

    pinned = RoutingPolicy(pinned_routes={"math": "gemini-2.5-pro"})
    await put_policy(app_pg, tenant.id, pinned)
    now[0] = 4.9
    assert await cache.policy_for(tenant.id) == RoutingPolicy()  # the default is cached too
    assert reads[0] == 1
    now[0] = 5.1
    assert await cache.policy_for(tenant.id) == pinned
    assert reads[0] == 2
    assert await cache.policy_for(tenant.id) == pinned
    assert reads[0] == 2

    await delete_policy(app_pg, tenant.id)
    cache.invalidate(tenant.id)
    assert await cache.policy_for(tenant.id) == RoutingPolicy()
    assert reads[0] == 3


async def test_policy_cache_is_bounded_and_does_not_cache_errors(
        tenant: Tenant, pg: asyncpg.Pool, app_pg: asyncpg.Pool) -> None:
    cache = PolicyCache(app_pg, 60.0, max_entries=2)
    for name in ("a", "b", "c"):
        await cache.policy_for(f"{tenant.id}-{name}")  # no row: the default
    assert len(cache._cache) == 2
    assert f"{tenant.id}-a" not in cache._cache  # the oldest went first

    await pg.execute("INSERT INTO routing_policies (tenant_id, policy) VALUES ($1, $2::jsonb)",
                     tenant.id, '{"weights": {"cost": "high"}}')
    for _ in range(2):
        with pytest.raises(SwitchyardError):
            await cache.policy_for(tenant.id)
    await put_policy(pg, tenant.id, RoutingPolicy(default_mode="council"))
    assert (await cache.policy_for(tenant.id)).default_mode == "council"
