"""The routing contract on the real stack, driven through the official OpenAI SDK: a named
model is served by that model first; what may serve it next is explicit (the request's
`models`, else the tenant's `fallbacks`, else — with `allow_substitution` — its class);
several providers' routes of one model share its traffic; every answer says which model
served it and whether that was a fallback."""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import openai
import pytest

from compose.gateway import Gateway
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually

NAMED, FALLBACK, PEER = "gpt-4o-mini", "claude-haiku-4-5", "gpt-4.1-nano"
HELLO: Any = [{"role": "user", "content": "hello there"}]


@dataclass
class Tenant:
    sdk: openai.AsyncOpenAI

    async def ask(self, model: str = NAMED, **extra: Any) -> Any:
        completion = await self.sdk.chat.completions.create(
            model=model, messages=HELLO, extra_body=extra or None)
        # The SDK keeps fields it does not model; `metadata` is ours (docs/api.md).
        metadata: Any = getattr(completion, "metadata", None)
        return metadata

    async def policy(self, **policy: Any) -> None:
        stored = await self.sdk.put("/routing/policy", cast_to=dict[str, Any], body=policy)
        assert stored["source"] == "stored"


@pytest.fixture
async def tenant(gateway: Gateway, pg: asyncpg.Pool) -> AsyncIterator[Tenant]:
    key_id, key = await create_key(pg, f"failover-{uuid.uuid4().hex[:8]}")
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0,
                             timeout=60)
    yield Tenant(sdk)
    await sdk.close()
    tenant_id = await pg.fetchval("SELECT tenant_id FROM api_keys WHERE id = $1", key_id)
    await pg.execute("DELETE FROM tenants WHERE id = $1", tenant_id)


async def test_a_named_model_fails_over_along_the_requests_own_chain(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await fake.configure(fail_models=[NAMED], error_status=503)
    # Without a chain (and no substitution) nothing else may serve it ...
    with pytest.raises(openai.APIStatusError) as caught:
        await tenant.ask()
    assert caught.value.status_code >= 500
    assert FALLBACK not in str(caught.value.body)
    # ... with one, the fallback answers and says so.
    metadata = await tenant.ask(models=[NAMED, FALLBACK])
    assert (metadata["model"], metadata["fallback"]) == (FALLBACK, True)
    assert [(a["model"], a["status"]) for a in metadata["attempts"]][-1] == (FALLBACK, "ok")
    assert metadata["attempts"][0]["model"] == NAMED


async def test_the_tenants_fallbacks_serve_a_named_model_that_fails(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await tenant.policy(fallbacks={NAMED: [FALLBACK]})
    assert (await tenant.ask())["fallback"] is False  # healthy: the named model itself
    await fake.configure(fail_models=[NAMED], error_status=503)
    metadata = await tenant.ask()
    assert (metadata["model"], metadata["fallback"]) == (FALLBACK, True)


async def test_a_named_healthy_model_is_served_whatever_the_bandit_learned(
        tenant: Tenant, fake: FakeAdmin) -> None:
    """Substitution ranks the class after the named model: it never takes its place."""
    await tenant.policy(allow_substitution=True, allowed_models=[NAMED, PEER])
    await fake.configure(fail_models=[NAMED], error_status=503)
    for _ in range(12):  # the bandit learns that NAMED fails and PEER answers
        assert (await tenant.ask())["model"] == PEER
    await fake.configure(fail_models=[])
    # Back as soon as its breaker lets it be tried again (cool-down, then a probe) ...
    await eventually(lambda: _served_by(tenant, NAMED), timeout_s=20, every_s=0.5)
    # ... and then it keeps its traffic.
    served = [(await tenant.ask())["model"] for _ in range(10)]
    assert served == [NAMED] * 10


async def _served_by(tenant: Tenant, model: str) -> bool:
    metadata = await tenant.ask()
    return bool(metadata["model"] == model and metadata["fallback"] is False)


async def test_providers_serving_one_model_share_its_traffic(
        tenant: Tenant, fake: FakeAdmin) -> None:
    served = Counter([(await tenant.ask("llama-3.3-70b"))["model"] for _ in range(30)])
    assert set(served) == {"groq/llama-3.3-70b-versatile",
                           "together/llama-3.3-70b-instruct-turbo"}, served
    # A route named by its own id is that route first.
    named = {(await tenant.ask("together/llama-3.3-70b-instruct-turbo"))["model"]
             for _ in range(5)}
    assert named == {"together/llama-3.3-70b-instruct-turbo"}


async def test_a_providers_route_failing_moves_to_the_other_provider_of_the_same_model(
        tenant: Tenant, fake: FakeAdmin) -> None:
    await fake.configure(fail_models=["llama-3.3-70b-versatile"], error_status=503)
    metadata = await tenant.ask("groq/llama-3.3-70b-versatile")
    assert metadata["model"] == "together/llama-3.3-70b-instruct-turbo"
    assert metadata["fallback"] is True


@pytest.mark.parametrize(("body", "status", "code", "param"), [
    ({"models": "claude-haiku-4-5"}, 422, "invalid_field", "models"),
    ({"models": [NAMED, "gpt-9"]}, 400, "unknown_model", "models.1"),
    ({"models": ["text-embedding-3-small"]}, 400, "wrong_model_kind", "models.0"),
    ({"model": "auto", "models": [FALLBACK]}, 400, "invalid_field", "models"),
])
async def test_a_bad_fallback_chain_is_refused_before_it_is_queued(
        tenant: Tenant, body: dict[str, Any], status: int, code: str, param: str) -> None:
    request = {"model": NAMED, "messages": HELLO, **body}
    with pytest.raises(openai.APIStatusError) as caught:
        await tenant.sdk.post("/chat/completions", cast_to=dict[str, Any], body=request)
    assert caught.value.status_code == status
    error: Any = caught.value.body
    assert (error["code"], error["param"]) == (code, param), error
