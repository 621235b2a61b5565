"""Any body the ingress accepts flows through the pipeline: a 5 MB prompt (what a 1M-token
context holds) and a 30 MB request (text and an image) are answered, streamed or whole, and
the provider receives all of it. Kafka's limits are raised together (`kafka.max_message_bytes`,
topics/kafka.py); what is over the limit is 413, never 503 `queue_unavailable`.

The session gateway's ingress keeps small body limits for the light oversized-input tests;
this module starts a second ingress with the default limits (32 MiB bodies, 20 MiB images),
served by the same routers."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from pydantic import ValidationError

from compose.children import wait_http
from compose.fake_upstream import expected_content
from compose.gateway import Gateway
from compose.stack import LocalStack, free_port
from tests.conftest import FakeAdmin, eventually
from tests.kafka_util import read_topic
from tests.test_errors import assert_openai_error
from topics import names
from topics.kafka import (
    MessageLimitError,
    check_message_limits,
    ensure_topics,
    kafka_message_bytes,
    make_producer,
)
from topics.settings import ENVELOPE_ALLOWANCE, IngressSettings, KafkaSettings, Settings

BODY_LIMIT = IngressSettings().max_body_bytes  # the default: 32 MiB
IMAGE_LIMIT = IngressSettings().max_image_bytes  # 20 MiB
WORD = "large "  # the fake counts words: one prompt token each, +4 per text


@pytest.fixture(scope="module")
def large_ingress(gateway: Gateway) -> Iterator[str]:
    port = free_port()
    name = "ingress-large"
    proc = gateway.spawn(name, "ingress", env={
        "SWITCHYARD_INGRESS__PORT": str(port),
        "SWITCHYARD_INGRESS__MAX_BODY_BYTES": str(BODY_LIMIT),
        "SWITCHYARD_INGRESS__MAX_IMAGE_BYTES": str(IMAGE_LIMIT)})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/v1/health", 30, Path(gateway.log_file(name)), proc)
        yield url
    finally:
        gateway.terminate(name)


@pytest.fixture
async def large_client(large_ingress: str, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=f"{large_ingress}/v1", api_key=api_key, max_retries=0,
                             timeout=100)
    yield sdk
    await sdk.close()


def _prompt(total_bytes: int) -> str:
    return WORD * (total_bytes // len(WORD))


def _messages(text_bytes: int, image_bytes: int) -> list[dict[str, Any]]:
    content: list[dict[str, Any]] = [{"type": "text", "text": _prompt(text_bytes)}]
    if image_bytes:
        data = base64.b64encode(b"\0" * image_bytes).decode()
        content.append({"type": "image_url",
                        "image_url": {"url": f"data:image/png;base64,{data}"}})
    return [{"role": "user", "content": content}]


# 5 MB of text: ~0.9M tokens at the router's low estimate, within a 1M-token window.
# 30 MB: 6 MB of text (a 2M-token window) and an image of 18 MB (24 MB as base64).
CASES = {"5MB": ("gpt-4.1-mini", 5_000_000, 0), "30MB": ("grok-4-1-fast", 6_000_000, 18_000_000)}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("case", list(CASES))
async def test_a_large_prompt_is_answered_and_reaches_the_provider_whole(
        large_client: openai.AsyncOpenAI, fake: FakeAdmin, case: str, stream: bool) -> None:
    model, text_bytes, image_bytes = CASES[case]
    messages: Any = _messages(text_bytes, image_bytes)  # the SDK's TypedDicts, as plain dicts
    words = text_bytes // len(WORD)
    if stream:
        chunks = await large_client.chat.completions.create(
            model=model, messages=messages, stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in chunks:
            parts += [c.delta.content or "" for c in chunk.choices]
            usage = chunk.usage or usage
        content = "".join(parts)
    else:
        completion = await large_client.chat.completions.create(
            model=model, messages=messages)
        content = completion.choices[0].message.content or ""
        usage = completion.usage
    assert content == expected_content(messages, 16)
    assert usage is not None
    assert usage.prompt_tokens == words + 4  # every word arrived
    (call,) = [c for c in (await fake.stats())["call_log"] if c["model"] is not None]
    assert call["body_bytes"] > text_bytes + image_bytes * 4 // 3


async def test_a_body_over_the_limit_is_413(large_ingress: str, api_key: str) -> None:
    # Declared too large: refused before the body is read, so none of it need be sent.
    port = int(large_ingress.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
                     f"Authorization: Bearer {api_key}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {BODY_LIMIT + 1}\r\n\r\n".encode())
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        body = await reader.readexactly(length)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 413 ")
    assert orjson.loads(body)["error"]["code"] == "request_too_large"


async def test_a_body_within_the_limit_whose_envelope_is_not_is_413_not_503(
        large_ingress: str, api_key: str) -> None:
    # Numbers are re-serialised in the envelope: `1e15` becomes `1000000000000000.0`. A body
    # under the body limit then makes a message over Kafka's: the client's to fix, not an
    # outage.
    numbers = b"[" + b",".join([b"1e15"] * 1_000_000) + b"]"
    prompt = _prompt(BODY_LIMIT - len(numbers) - 1000).encode()
    body = (b'{"model":"gpt-4.1-mini","messages":[{"role":"user","content":"' + prompt
            + b'"}],"x_numbers":' + numbers + b"}")
    assert len(body) <= BODY_LIMIT
    async with httpx.AsyncClient(base_url=large_ingress, timeout=60) as http:
        response = await http.post(
            "/v1/chat/completions", content=body,
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"})
    error = assert_openai_error(response, 413, "request_too_large")
    assert "request queue" in error["message"]


def test_settings_refuse_a_body_limit_kafka_cannot_carry() -> None:
    with pytest.raises(ValidationError, match="SWITCHYARD_KAFKA__MAX_MESSAGE_BYTES"):
        Settings(ingress=IngressSettings(max_body_bytes=40_000_000))
    raised = Settings(ingress=IngressSettings(max_body_bytes=40_000_000),
                      kafka=KafkaSettings(max_message_bytes=40_000_000 + ENVELOPE_ALLOWANCE))
    assert raised.kafka.max_message_bytes > raised.ingress.max_body_bytes


async def test_a_topic_below_the_limit_stops_a_start_until_init_raises_it(
        stack: LocalStack) -> None:
    kafka = stack.settings.kafka
    topic = names.dlq(names.REPLIES)  # nobody writes there during the suite
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        await admin.alter_configs([ConfigResource(
            ConfigResourceType.TOPIC, topic,
            {"max.message.bytes": "1048588", "retention.ms": "86400000"})])
        # A config change reaches the broker's view a moment later (KRaft metadata).
        error = await eventually(lambda: _start_check(kafka))
        assert f"{topic}=1048588" in str(error)
        assert "switchyard init" in str(error)
        await ensure_topics(kafka)  # what `switchyard init` and the stack launcher run
        await eventually(lambda: _start_check(kafka, passes=True))
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)])
        configs = {entry[0]: entry[1] for entry in response.resources[0][4]}
    finally:
        await admin.close()
    assert configs["max.message.bytes"] == str(kafka_message_bytes(kafka))
    assert configs["retention.ms"] == "86400000"  # the topic's other settings are kept


async def _start_check(kafka: KafkaSettings, *, passes: bool = False) -> object:
    """The start-up check's error (None if it passed), or with `passes`, whether it did."""
    try:
        await check_message_limits(kafka)
    except MessageLimitError as exc:
        return None if passes else exc
    return passes


LONG_ANSWER = "answer " * 700_000  # ~5 MB: one `done` frame, whole


async def test_a_long_answer_is_relayed_whole(client: openai.AsyncOpenAI,
                                              fake: FakeAdmin) -> None:
    await fake.configure(answer=LONG_ANSWER)
    completion = await client.chat.completions.create(
        model="gpt-4.1-mini", messages=[{"role": "user", "content": "write a lot"}])
    assert completion.choices[0].message.content == LONG_ANSWER


async def test_a_batch_request_and_its_answer_of_5_mb_each_cross_kafka(
        gateway: Gateway, fake: FakeAdmin, api_key_ids: tuple[str, str]) -> None:
    await fake.configure(answer=LONG_ANSWER)
    request_id = f"batch-large-{uuid.uuid4().hex}"
    now_ms = int(time.time() * 1000)
    messages = _messages(5_000_000, 0)
    envelope = orjson.dumps({
        "schema_version": 1, "request_id": request_id, "tenant_id": api_key_ids[0],
        "key_id": api_key_ids[1], "received_at_ms": now_ms, "deadline_ms": now_ms + 60_000,
        "body": {"model": "gpt-4.1-mini", "messages": messages},
        "reply": {"topic": names.REPLIES}})
    producer = make_producer(gateway.settings.kafka)  # max_request_size raised with the topics
    await producer.start()
    try:
        await producer.send_and_wait(names.REQUESTS, envelope, key=request_id.encode())
    finally:
        await producer.stop()

    def mine(records: list[Any]) -> list[dict[str, Any]]:
        frames = [orjson.loads(r.value) for r in records if r.key == request_id.encode()]
        return [f for f in frames if f["request_id"] == request_id]

    records = await read_topic(gateway.settings.kafka, names.REPLIES,
                               lambda got: any(f["kind"] == "done" for f in mine(got)))
    frames = mine(records)
    assert [f["kind"] for f in frames] == ["meta", "done"]
    completion = frames[1]["data"]["completion"]
    assert completion["choices"][0]["message"]["content"] == LONG_ANSWER
    assert completion["usage"]["prompt_tokens"] == 5_000_000 // len(WORD) + 4
