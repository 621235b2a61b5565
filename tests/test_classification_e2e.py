"""Semantic routing end to end: prompts sent with `model: "auto"` are classified by the ONNX
stage and served by the routes the tenant's policy prefers for their categories, whether the
router classifies them itself (the default) or a classifier process does."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import asyncpg
import httpx
import pytest

from compose.gateway import Gateway
from state.keys import create_key
from tests.conftest import FakeAdmin, eventually
from tests.kafka_util import caught_up, request_ids_in
from topics import names

CODE_PROMPT = ("Write a Python function that returns the n-th Fibonacci number using "
               "memoization, with a docstring and type hints.")
SUMMARY_PROMPT = (
    "Summarize the following passage in two sentences.\n\nThe Apollo program was the third "
    "United States human spaceflight program carried out by NASA, which succeeded in "
    "preparing and landing the first humans on the Moon from 1968 to 1972. It was first "
    "conceived during Dwight D. Eisenhower's administration as a three-person spacecraft "
    "to follow the one-person Project Mercury, which put the first Americans in space.")


@pytest.fixture
async def tenant(gateway: Gateway, pg: asyncpg.Pool) -> AsyncIterator[httpx.AsyncClient]:
    _, key = await create_key(pg, f"semantic-{uuid.uuid4().hex[:8]}")
    async with httpx.AsyncClient(base_url=gateway.url, timeout=30,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        stored = await http.put("/v1/routing/policy", json={"pinned_routes": {
            "code": "claude-sonnet-4-6", "summarization": "gemini-2.5-flash"}})
        assert stored.status_code == 200, stored.text
        yield http


@pytest.mark.parametrize(("prompt", "category", "model", "provider"), [
    (CODE_PROMPT, "code", "claude-sonnet-4-6", "anthropic"),
    (SUMMARY_PROMPT, "summarization", "gemini-2.5-flash", "gemini"),
])
async def test_auto_prompts_are_classified_and_served_by_the_pinned_route(
        tenant: httpx.AsyncClient, fake: FakeAdmin, pg: asyncpg.Pool, prompt: str,
        category: str, model: str, provider: str) -> None:
    response = await tenant.post("/v1/chat/completions", json={
        "model": "auto", "messages": [{"role": "user", "content": prompt}]})

    assert response.status_code == 200, response.text
    metadata = response.json()["metadata"]
    assert (metadata["model"], metadata["provider"]) == (model, provider)
    request_id = response.headers["x-request-id"]
    row = await eventually(lambda: pg.fetchrow(
        "SELECT category FROM usage_events WHERE request_id = $1", request_id))
    assert row["category"] == category  # the label the classifier gave travels to the ledger


async def test_a_classifier_stage_and_an_inline_classifying_router_share_the_requests(
        gateway: Gateway, tenant: httpx.AsyncClient, fake: FakeAdmin,
        pg: asyncpg.Pool) -> None:
    """The split topology beside the default one, as during a switch between them: a
    classifier process forwards its share of llm.requests to llm.classified, where a router
    with classify_inline off picks it up. Every request is labelled whichever way it went."""
    kafka = gateway.settings.kafka
    gateway.spawn("classifier", "classifier",
                  env={"SWITCHYARD_CLASSIFIER__READER_CHECK_INTERVAL_S": "0.3"})
    request_ids: list[str] = []
    try:
        # Alone beside routers that classify inline, it would forward requests to nobody.
        log = gateway.log_file("classifier")
        await eventually(lambda: "no router reads llm.classified" in log.read_text(),
                         timeout_s=30)
        gateway.spawn("router-split", "router",
                      env={"SWITCHYARD_ROUTER__CLASSIFY_INLINE": "false"})
        split_log = gateway.log_file("router-split")
        await eventually(lambda: "assigned [" in split_log.read_text(), timeout_s=30)

        async def one_of_ours_went_through_the_classifier_stage() -> bool:
            response = await tenant.post("/v1/chat/completions", json={
                "model": "auto", "messages": [{"role": "user", "content": CODE_PROMPT}]})
            assert response.status_code == 200, response.text
            assert response.json()["metadata"]["provider"] == "anthropic"
            request_ids.append(response.headers["x-request-id"])
            # Not merely that llm.classified grew: the classifier also forwards requests the
            # rebalance redelivers to it, which the routers' claims then skip.
            return bool(set(request_ids) & await request_ids_in(kafka, names.CLASSIFIED))

        # Until the group rebalances, the session's router still reads every partition.
        await eventually(one_of_ours_went_through_the_classifier_stage, timeout_s=60,
                         every_s=0.2)
        # Everything forwarded is settled before the split router goes; nothing else reads
        # llm.classified, so what it left there would wait for good.
        await eventually(lambda: caught_up(kafka, names.CLASSIFIED_GROUP, names.CLASSIFIED),
                         timeout_s=30)
    finally:
        gateway.terminate("classifier")
        if "router-split" in gateway.processes:
            gateway.terminate("router-split")

    rows = await eventually(lambda: _categories(pg, request_ids))
    assert rows == ["code"] * len(request_ids)


async def _categories(pg: asyncpg.Pool, request_ids: list[str]) -> list[str] | None:
    rows = await pg.fetch("SELECT category FROM usage_events WHERE request_id = ANY($1)",
                          request_ids)
    return [row["category"] for row in rows] if len(rows) == len(request_ids) else None
