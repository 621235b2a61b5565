"""The routing contract on the real stack, driven through the official OpenAI SDK: a named
model is served by that model first; what may serve it next is explicit (the request's
`models`, else the tenant's `fallbacks`, else — with `allow_substitution` — its class);
several providers' routes of one model share its traffic; every answer says which model
served it and whether that was a fallback."""

from __future__ import annotations

import asyncio
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


# --- What each kind of provider error decides -------------------------------------------------

BIGGER = "gpt-4.1-mini"  # a context window of ~1M tokens, against NAMED's 128K
LONG: Any = [{"role": "user", "content": "a long prompt " * 30}]  # ~100 tokens at the fake


async def _create(tenant: Tenant, stream: bool, messages: Any = LONG, **extra: Any) -> Any:
    """The answer's metadata, streamed or not, through the official SDK."""
    if not stream:
        completion = await tenant.sdk.chat.completions.create(
            model=NAMED, messages=messages, extra_body=extra or None)
        return getattr(completion, "metadata", None)
    chunks = [c async for c in await tenant.sdk.chat.completions.create(
        model=NAMED, messages=messages, stream=True, stream_options={"include_usage": True},
        extra_body=extra or None)]
    return (chunks[-1].model_extra or {})["metadata"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_prompt_too_long_moves_to_a_model_whose_window_fits(
        tenant: Tenant, fake: FakeAdmin, stream: bool) -> None:
    await fake.configure(per_model={NAMED: {"context_window": 20},
                                    "gpt-4o": {"context_window": 20}})
    # gpt-4o's window is no larger than NAMED's: it is never asked.
    metadata = await _create(tenant, stream, models=["gpt-4o", BIGGER])
    assert (metadata["model"], metadata["fallback"]) == (BIGGER, True)
    assert [a["status"] for a in metadata["attempts"]] == ["error", "ok"]
    calls = (await fake.stats())["calls_by_model"]
    assert "gpt-4o" not in calls
    assert calls[NAMED] == 1  # a refusal is not retried
    # Without a larger model to go to, the caller gets the provider's own refusal.
    with pytest.raises(openai.BadRequestError) as refused:
        await _create(tenant, stream)
    assert refused.value.code == "upstream_context_length_exceeded"


async def test_a_prompt_that_cannot_fit_skips_the_small_windows_up_front(
        tenant: Tenant, fake: FakeAdmin) -> None:
    huge: Any = [{"role": "user", "content": "x" * 900_000}]  # > 128K tokens at any rate
    metadata = await _create(tenant, False, messages=huge, models=[BIGGER])
    assert metadata["model"] == BIGGER
    assert NAMED not in (await fake.stats())["calls_by_model"]
    with pytest.raises(openai.BadRequestError) as refused:
        await _create(tenant, False, messages=huge)
    assert (refused.value.code, refused.value.param) == ("context_length_exceeded", "messages")


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_a_content_filter_refusal_is_returned_as_it_is(
        tenant: Tenant, fake: FakeAdmin, stream: bool) -> None:
    await fake.configure(per_model={NAMED: {"content_filter": True}})
    with pytest.raises(openai.BadRequestError) as refused:
        await _create(tenant, stream, models=[FALLBACK])
    assert refused.value.code == "upstream_content_filtered"
    assert "content management policy" in refused.value.message
    assert (await fake.stats())["calls_by_model"] == {NAMED: 1}  # no retry, no substitute


async def test_a_fallbacks_own_refusal_does_not_hide_the_primarys_error(
        tenant: Tenant, fake: FakeAdmin) -> None:
    """The primary is down; the fallback cannot continue an assistant prefill. What the
    caller needs to hear is why the model it asked for did not answer."""
    await fake.configure(fail_models=[NAMED], error_status=503, retry_after="1",
                         per_model={"claude-haiku-4-5": {"rejects_prefill": True}})
    prefill: Any = [*HELLO, {"role": "assistant", "content": "Certainly! Here"}]
    with pytest.raises(openai.APIStatusError) as failed:
        await _create(tenant, False, messages=prefill, models=[FALLBACK])
    assert failed.value.status_code == 503
    assert failed.value.response.headers["retry-after"] == "1"
    assert failed.value.code == "upstream_overloaded"
    assert f"the last, on {FALLBACK}: upstream_bad_request" in failed.value.message


async def test_our_key_refused_fails_over_to_another_provider_and_opens_the_breaker(
        tenant: Tenant, fake: FakeAdmin, gateway: Gateway) -> None:
    groq, together = "groq/llama-3.3-70b-versatile", "together/llama-3.3-70b-instruct-turbo"
    await fake.configure(fail_models=["llama-3.3-70b-versatile"], error_status=401)
    metadata = await tenant.ask(groq)
    assert (metadata["model"], metadata["fallback"]) == (together, True)
    assert (await fake.stats())["calls_by_model"]["llama-3.3-70b-versatile"] == 1
    stats = await tenant.sdk.get("/providers/stats", cast_to=dict[str, Any])
    assert {b["route"]: b["state"] for b in stats["breakers"]}.get(groq) == "open"
    # While it is open, the route is not called at all.
    assert (await tenant.ask(groq))["model"] == together
    assert (await fake.stats())["calls_by_model"]["llama-3.3-70b-versatile"] == 1


async def test_an_outage_is_served_by_the_fallback_and_the_primary_takes_back_over(
        tenant: Tenant, fake: FakeAdmin, pg: asyncpg.Pool) -> None:
    await fake.configure(fail_models=[NAMED], error_status=503)
    during = [await _answered(tenant) for _ in range(8)]
    assert {model for model, _ in during} == {FALLBACK}
    # Accounting: the fallback's model and usage are what was billed; failed calls cost 0.
    # The ledger is the usage worker's, a hop behind the answer.
    async def billed() -> list[asyncpg.Record] | None:
        rows = await pg.fetch("SELECT model, status, cost_usd FROM usage_events"
                              " WHERE request_id = $1 ORDER BY attempt", during[0][1])
        return rows if any(r["status"] == "ok" for r in rows) else None

    rows = await eventually(billed)
    assert [r["model"] for r in rows][-1] == FALLBACK
    assert all(r["cost_usd"] == 0 for r in rows if r["status"] != "ok")
    assert [r["status"] for r in rows].count("ok") == 1
    assert rows[-1]["cost_usd"] > 0

    await fake.configure(fail_models=[])
    healed = asyncio.get_running_loop().time()
    await eventually(lambda: _back_on_the_primary(tenant), timeout_s=20, every_s=0.5)
    back_after_s = asyncio.get_running_loop().time() - healed
    assert back_after_s < 10  # the breaker's cool-down (5 s) and one probe
    assert [(await _answered(tenant))[0] for _ in range(5)] == [NAMED] * 5


async def _answered(tenant: Tenant) -> tuple[str, str]:
    raw = await tenant.sdk.chat.completions.with_raw_response.create(
        model=NAMED, messages=HELLO, extra_body={"models": [FALLBACK]})
    metadata: Any = getattr(raw.parse(), "metadata", None)
    return metadata["model"], raw.headers["x-request-id"]


async def _back_on_the_primary(tenant: Tenant) -> bool:
    return (await _answered(tenant))[0] == NAMED
