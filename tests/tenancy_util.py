"""Helpers for the tests of tenants, keys, roles and revocation: a platform administrator,
tenants made through the admin API, batch requests published straight to Kafka."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import orjson
from aiokafka import AIOKafkaProducer

from compose.children import wait_http
from compose.gateway import Gateway
from compose.stack import free_port
from state.tenants import ensure_platform_admin
from tests.kafka_util import read_topic
from tests.tcp_proxy import TcpProxy
from topics import names
from topics.kafka import make_producer

CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
TENANTS = "/v1/admin/tenants"


def keys_url(tenant_id: str) -> str:
    return f"/v1/tenants/{tenant_id}/api-keys"


def client(url: str, api_key: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, timeout=30,
                             headers={"Authorization": f"Bearer {api_key}"})


@dataclass
class Admin:
    """A platform administrator: its own (platform) tenant and its client."""

    tenant_id: str
    http: httpx.AsyncClient


async def new_platform_admin(pg: asyncpg.Pool) -> tuple[str, str]:
    """(tenant id, key) of a platform_admin key of a platform tenant of its own, as
    `switchyard admin create` makes them."""
    async with pg.acquire() as conn:
        tenant_id, _, api_key = await ensure_platform_admin(
            conn, f"platform-{uuid.uuid4().hex[:12]}", "tests")
    return tenant_id, api_key


@dataclass
class Tenant:
    id: str
    admin_key: str  # its first key, tenant_admin
    created: dict[str, Any]  # the answer that created it


async def new_tenant(admin: httpx.AsyncClient, **body: Any) -> Tenant:
    response = await admin.post(TENANTS, json={"name": f"t-{uuid.uuid4().hex[:12]}", **body})
    assert response.status_code == 201, response.text
    created = response.json()
    return Tenant(created["tenant_id"], created["api_keys"][0]["key"], created)


async def new_key(admin: httpx.AsyncClient, tenant_id: str, **body: Any) -> dict[str, Any]:
    response = await admin.post(keys_url(tenant_id), json={"name": "a key", **body})
    assert response.status_code == 201, response.text
    key: dict[str, Any] = response.json()
    return key


@asynccontextmanager
async def platform(pg: asyncpg.Pool, gateway: Gateway) -> AsyncIterator[Admin]:
    tenant_id, api_key = await new_platform_admin(pg)
    async with client(gateway.url, api_key) as http:
        yield Admin(tenant_id, http)


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, response.text
    message: str = error["message"]
    return message


def rfc3339(value: object) -> datetime:
    """`value` read as an RFC 3339 string with an offset (what the seed SDKs decode)."""
    assert isinstance(value, str), value
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None, value
    return parsed


async def status_of(http: httpx.AsyncClient, body: dict[str, Any] | None = None) -> str:
    """"ok", or the error code a chat completion gets."""
    response = await http.post("/v1/chat/completions", json=body or CHAT)
    if response.status_code == 200:
        return "ok"
    code: str = response.json()["error"]["code"]
    return code


async def batch(gateway: Gateway, tenant_id: str, key_id: str,
                body: dict[str, Any] | None = None,
                **fields: Any) -> tuple[str, dict[str, Any]]:
    """Publish one request envelope to `llm.requests`, as a batch producer does, and wait for
    its last frame on the reply topic. Returns (request id, that frame)."""
    request_id = f"batch-{uuid.uuid4().hex}"
    now_ms = int(time.time() * 1000)
    envelope = orjson.dumps({
        "schema_version": 1, "request_id": request_id, "tenant_id": tenant_id,
        "key_id": key_id, "received_at_ms": now_ms, "deadline_ms": now_ms + 60_000,
        "body": body or CHAT, "reply": {"topic": names.REPLIES}, **fields})
    producer: AIOKafkaProducer = make_producer(gateway.settings.kafka)
    await producer.start()
    try:
        await producer.send_and_wait(names.REQUESTS, envelope, key=request_id.encode())
    finally:
        await producer.stop()

    def last(records: list[Any]) -> dict[str, Any] | None:
        for record in records:
            if record.key == request_id.encode():
                frame: dict[str, Any] = orjson.loads(record.value)
                if frame["kind"] in ("done", "error"):
                    return frame
        return None

    records = await read_topic(gateway.settings.kafka, names.REPLIES,
                               lambda got: last(got) is not None, timeout_s=30)
    frame = last(records)
    assert frame is not None
    return request_id, frame


@asynccontextmanager
async def ingress_behind_proxy(gateway: Gateway,
                               logs: Path) -> AsyncIterator[tuple[str, TcpProxy]]:
    """One more ingress on the gateway's stack whose Redis is reached through a proxy the
    test can cut, with a 1 s socket timeout; yields its URL and the proxy."""
    redis_url = urlsplit(gateway.settings.redis.url)
    assert redis_url.hostname is not None
    assert redis_url.port is not None
    proxy = TcpProxy(redis_url.hostname, redis_url.port)
    await proxy.start()
    try:
        async with ingresses(gateway, logs, {
                "SWITCHYARD_REDIS__URL": f"redis://127.0.0.1:{proxy.port}{redis_url.path}",
                "SWITCHYARD_REDIS__SOCKET_TIMEOUT_S": "1"}) as [url]:
            yield url, proxy
    finally:
        await proxy.aclose()


@asynccontextmanager
async def ingresses(gateway: Gateway, logs: Path, *envs: dict[str, str],
                    routers: int = 0) -> AsyncIterator[list[str]]:
    """More processes on the gateway's stack: `routers` routers and one ingress per `envs`
    (settings over the gateway's, as environment variables); yields the ingresses' URLs."""
    extra = Gateway(gateway.settings, logs, log=lambda _: None)
    urls = []
    try:
        for i in range(routers):
            extra.spawn(f"router-extra-{i}", "router")
        for i, env in enumerate(envs):
            port = free_port()
            proc = extra.spawn(f"ingress-{i}", "ingress",
                               env={"SWITCHYARD_INGRESS__PORT": str(port), **env})
            url = f"http://{gateway.settings.ingress.host}:{port}"
            await asyncio.to_thread(wait_http, f"{url}/v1/health", 60,
                                    extra.log_file(f"ingress-{i}"), proc)
            urls.append(url)
        yield urls
    finally:
        await asyncio.to_thread(extra.stop)
