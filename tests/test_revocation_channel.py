"""The revocation broadcast's interface (`state/revocations.py`), on the real Redis: what a
listener hands each cache, token revocations kept until the token would have expired, and
everything forgotten whenever the subscription is (re)made."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis
from pydantic import ValidationError

from compose.stack import LocalStack
from state.revocations import (
    TOKENS_KEY,
    RevocationListener,
    publish_revocation,
    revoked_tokens,
)
from tests.conftest import eventually
from topics.names import REVOCATIONS_CHANNEL


class Recorder:
    """A cache that writes down what it is told to forget."""

    def __init__(self) -> None:
        self.told: list[tuple[str, str]] = []

    def drop_key(self, key_id: str) -> None:
        self.told.append(("key", key_id))

    def drop_tenant(self, tenant_id: str) -> None:
        self.told.append(("tenant", tenant_id))

    def drop_all(self) -> None:
        self.told.append(("all", ""))


def _ms(from_now_s: float) -> int:
    return int((time.time() + from_now_s) * 1000)


LISTENER_NAME = f"revocations-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def listening(stack: LocalStack) -> AsyncIterator[tuple[Recorder, dict[str, int]]]:
    """A listener on a client of its own, named so that a test can cut its connections
    alone (the suite's gateway shares this Redis)."""
    own = redis.Redis.from_url(stack.settings.redis.url, client_name=LISTENER_NAME)
    cache, tokens = Recorder(), dict[str, int]()
    listener = RevocationListener(own, [cache], on_token=tokens.__setitem__, check_s=0.5,
                                  answer_s=2.0)
    ready = asyncio.Event()
    task = asyncio.create_task(listener.run(ready))
    await asyncio.wait_for(ready.wait(), 10)
    yield cache, tokens
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await own.aclose()


async def test_each_kind_reaches_its_hook(r: redis.Redis,
                                          listening: tuple[Recorder, dict[str, int]]) -> None:
    cache, tokens = listening
    assert cache.told[0] == ("all", "")  # subscribed: whatever came before is unknown
    token, expires = f"tok-{uuid.uuid4().hex}", _ms(60)
    await publish_revocation(r, "key", "k_1")
    await publish_revocation(r, "tenant", "t_1")
    await publish_revocation(r, "token", token, expires_at_ms=expires)
    await eventually(lambda: tokens.get(token) == expires, timeout_s=10)
    assert cache.told[1:] == [("key", "k_1"), ("tenant", "t_1")]


async def test_token_revocations_last_as_long_as_the_token(r: redis.Redis) -> None:
    live, gone = f"tok-{uuid.uuid4().hex}", f"tok-{uuid.uuid4().hex}"
    await publish_revocation(r, "token", gone, expires_at_ms=_ms(-1))
    await publish_revocation(r, "token", live, expires_at_ms=_ms(60))
    revoked = await revoked_tokens(r)
    assert live in revoked
    assert gone not in revoked
    assert await r.zscore(TOKENS_KEY, gone) is None  # pruned, not only filtered
    with pytest.raises(ValidationError):
        await publish_revocation(r, "token", live)  # a token's revocation needs its expiry
    with pytest.raises(ValidationError):
        await publish_revocation(r, "key", "k_1", expires_at_ms=_ms(60))


async def test_a_listener_loads_the_token_revocations_made_before_it_subscribed(
        r: redis.Redis) -> None:
    token, expires = f"tok-{uuid.uuid4().hex}", _ms(60)
    await publish_revocation(r, "token", token, expires_at_ms=expires)
    tokens: dict[str, int] = {}
    listener = RevocationListener(r, [], on_token=tokens.__setitem__, check_s=0.5,
                                  answer_s=2.0)
    ready = asyncio.Event()
    task = asyncio.create_task(listener.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert tokens[token] == expires
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_a_lost_subscription_is_made_again_and_every_cache_forgets_everything(
        r: redis.Redis, listening: tuple[Recorder, dict[str, int]]) -> None:
    cache, _ = listening
    before = cache.told.count(("all", ""))
    for connection in await r.client_list(_type="pubsub"):
        if connection["name"] == LISTENER_NAME:
            await r.client_kill_filter(_id=connection["id"])
    await eventually(lambda: cache.told.count(("all", "")) > before, timeout_s=15)
    await publish_revocation(r, "key", "k_after")  # heard on the new subscription
    await eventually(lambda: ("key", "k_after") in cache.told, timeout_s=10)


async def test_an_unreadable_message_makes_every_cache_forget_everything(
        r: redis.Redis, listening: tuple[Recorder, dict[str, int]]) -> None:
    cache, _ = listening
    before = cache.told.count(("all", ""))
    await r.publish(REVOCATIONS_CHANNEL, b'{"schema_version": 2, "kind": "group"}')
    await eventually(lambda: cache.told.count(("all", "")) > before, timeout_s=10)
