"""Bad input gets an OpenAI-shaped error with the right status, never a 500 or a traceback;
a message nobody can decode goes to the dead-letter topic and the pipeline keeps serving."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from compose.gateway import Gateway
from ingress.metrics import IngressMetrics
from ingress.middleware import RequestIdentity
from tests.kafka_util import read_topic
from topics import names
from topics.kafka import make_producer

GOOD = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def assert_openai_error(response: httpx.Response, status: int, code: str,
                        param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["x-request-id"].startswith("req_")
    error: dict[str, Any] = response.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}
    assert error["code"] == code
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    return error


async def test_malformed_json_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", content=b'{"model": "gpt-4o-mini",',
                               headers={"content-type": "application/json"})
    assert_openai_error(response, 400, "invalid_json")


async def test_a_json_array_is_not_a_request(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=[GOOD])
    assert_openai_error(response, 400, "invalid_json")


@pytest.mark.parametrize(("body", "code", "param"), [
    ({"messages": GOOD["messages"]}, "missing_field", "model"),
    ({"model": "gpt-4o-mini"}, "missing_field", "messages"),
    ({**GOOD, "messages": []}, "invalid_field", "messages"),
    ({**GOOD, "messages": "hi"}, "invalid_field", "messages"),
    ({**GOOD, "messages": [{"role": "wizard", "content": "x"}]}, "invalid_field",
     "messages.0.role"),
    ({**GOOD, "stream": "yes"}, "invalid_field", "stream"),
    ({**GOOD, "temperature": 7}, "invalid_field", "temperature"),
    ({**GOOD, "max_tokens": "many"}, "invalid_field", "max_tokens"),
    ({**GOOD, "model": 42}, "invalid_field", "model"),
])
async def test_missing_or_mistyped_fields_are_422(http: httpx.AsyncClient, body: dict[str, Any],
                                                  code: str, param: str) -> None:
    response = await http.post("/v1/chat/completions", json=body)
    assert_openai_error(response, 422, code, param)


async def test_unknown_model_is_404(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json={**GOOD, "model": "gpt-9-ultra"})
    error = assert_openai_error(response, 404, "model_not_found", "model")
    assert "gpt-9-ultra" in error["message"]


async def test_body_over_the_size_limit_is_413(http: httpx.AsyncClient,
                                               gateway: Gateway) -> None:
    limit = gateway.settings.ingress.max_body_bytes
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * (limit + 1)}]}
    response = await http.post("/v1/chat/completions", json=huge)
    assert_openai_error(response, 413, "request_too_large")


async def test_body_over_the_limit_without_content_length_is_413(
        http: httpx.AsyncClient, gateway: Gateway) -> None:
    limit = gateway.settings.ingress.max_body_bytes

    async def chunked() -> Any:  # no Content-Length: the limit must hold while reading
        for _ in range(limit // 65536 + 2):
            yield b"x" * 65536

    response = await http.post("/v1/chat/completions", content=chunked())
    assert_openai_error(response, 413, "request_too_large")


@pytest.mark.parametrize("authorization", [None, "Bearer sy-not-a-real-key", "Basic abc",
                                           "Bearer"])
async def test_missing_or_invalid_key_is_401(gateway: Gateway,
                                             authorization: str | None) -> None:
    headers = {"authorization": authorization} if authorization is not None else {}
    async with httpx.AsyncClient(base_url=gateway.url) as anonymous:
        response = await anonymous.post("/v1/chat/completions", json=GOOD, headers=headers)
    error = assert_openai_error(response, 401,
                                "missing_api_key" if authorization is None else "invalid_api_key")
    assert error["type"] == "authentication_error"


async def test_the_openai_sdk_raises_its_typed_errors(gateway: Gateway) -> None:
    sdk = openai.AsyncOpenAI(base_url=f"{gateway.url}/v1", api_key="sy-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(model="gpt-4o-mini", messages=GOOD["messages"])  # type: ignore[arg-type]
    await sdk.close()


async def test_unknown_route_and_wrong_method_are_openai_shaped(
        http: httpx.AsyncClient) -> None:
    assert_openai_error(await http.get("/v1/nope"), 404, "not_found")
    assert_openai_error(await http.get("/v1/chat/completions"), 405, "method_not_allowed")


async def test_bad_timeout_header_is_400(http: httpx.AsyncClient) -> None:
    response = await http.post("/v1/chat/completions", json=GOOD,
                               headers={"x-switchyard-timeout-ms": "soon"})
    assert_openai_error(response, 400, "invalid_header", "x-switchyard-timeout-ms")


@pytest.mark.parametrize("garbage", [
    b"not json at all {",
    b'{"schema_version": 1, "request_id": "r"}',  # JSON, but not a request envelope
    b'{"schema_version": 99, "request_id": "r", "tenant_id": "t", "key_id": "k", '
    b'"received_at_ms": 0, "deadline_ms": 0, "body": {}, "reply": {"topic": "x"}}',
    # Whitespace in a request id would break the reply channel's frame headers.
    b'{"schema_version": 1, "request_id": "r 1", "tenant_id": "t", "key_id": "k", '
    b'"received_at_ms": 0, "deadline_ms": 0, "body": {}, "reply": {"topic": "x"}}',
])
async def test_undecodable_request_goes_to_the_dlq_and_the_next_is_served(
        gateway: Gateway, client: openai.AsyncOpenAI, garbage: bytes) -> None:
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(names.REQUESTS, garbage, key=b"garbage")
    finally:
        await producer.stop()

    def landed(records: list[Any]) -> bool:
        return any(r.value == garbage for r in records)

    records = await read_topic(gateway.settings.kafka, names.dlq(names.REQUESTS), landed)
    dead = next(r for r in records if r.value == garbage)
    headers = dict(dead.headers)
    assert headers[names.H_DLQ_REASON].startswith(b"undecodable")
    assert headers[names.H_DLQ_SOURCE].startswith(names.REQUESTS.encode())

    completion = await client.chat.completions.create(model="gpt-4o-mini",
                                                      messages=[{"role": "user", "content": "ok"}])
    assert completion.choices[0].message.content


async def test_an_unexpected_failure_is_an_openai_shaped_500_with_a_request_id() -> None:
    async def broken(_request: Request) -> Response:
        raise RuntimeError("a bug")

    metrics = IngressMetrics(CollectorRegistry())
    app = Starlette(routes=[Route("/boom", broken)],
                    middleware=[Middleware(RequestIdentity, metrics=metrics,
                                           routes=frozenset({"/boom"}))])
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gateway") as local:
        response = await local.get("/boom")
    error = assert_openai_error(response, 500, "internal_error")
    assert "a bug" not in error["message"]  # internals stay in the log
