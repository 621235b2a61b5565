"""Chat completions through the whole pipeline: HTTP → Kafka → router → fake upstream →
Redis pub/sub → HTTP/SSE, with the official OpenAI SDK as the client."""

from __future__ import annotations

import asyncio
from typing import cast

import openai
from openai.types.chat import ChatCompletionMessageParam

from compose.fake_upstream import expected_content
from tests.conftest import FakeAdmin


def ask(word: str) -> list[ChatCompletionMessageParam]:
    return [{"role": "system", "content": "be brief"},
            {"role": "user", "content": f"{word} please answer"}]


async def test_non_streaming_completion(client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    await fake.configure(tokens=12, prompt_tokens_override=40)
    messages = ask("alpha")

    completion = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)

    assert completion.choices[0].message.content == expected_content(messages, 12)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "gpt-4o-mini"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (40, 12)
    assert (completion._request_id or "").startswith("req_")
    metadata = completion.metadata
    assert metadata is not None
    assert metadata["provider"] == "openai"
    # 40 input tokens at $0.15/M + 12 output tokens at $0.60/M
    assert metadata["cost_usd_exact"] == "0.0000132"
    # A JSON number written with those digits (the SDK's type says str; it does not check).
    assert cast(object, metadata["cost_usd"]) == 0.0000132


async def test_streaming_every_chunk_in_order_then_usage(client: openai.AsyncOpenAI,
                                                          fake: FakeAdmin) -> None:
    await fake.configure(tokens=20, inter_token_ms=2, prompt_tokens_override=9)
    messages = ask("bravo")

    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True,
        stream_options={"include_usage": True})
    chunks = [chunk async for chunk in stream]

    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert [c.choices[0].delta.content for c in content_chunks] == [
        f"bravo-{i} " for i in range(20)]
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert (usage_chunk.usage.prompt_tokens, usage_chunk.usage.completion_tokens) == (9, 20)


async def test_streaming_without_include_usage_sends_no_usage_chunk(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=ask("c"),
                                                  stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)


async def test_200_concurrent_streams_get_exactly_their_own_content(
        client: openai.AsyncOpenAI, fake: FakeAdmin) -> None:
    await fake.configure(tokens=30, inter_token_ms=5)

    async def one(i: int) -> tuple[str, str]:
        messages = ask(f"w{i}")
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                      stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        return text, expected_content(messages, 30)

    results = await asyncio.gather(*(one(i) for i in range(200)))

    assert all(got == want for got, want in results)
    assert (await fake.stats())["completed_streams"] >= 200


async def test_models_lists_the_catalog(client: openai.AsyncOpenAI) -> None:
    ids = [model.id async for model in client.models.list()]
    assert {"gpt-4o-mini", "gpt-4o"} <= set(ids)
