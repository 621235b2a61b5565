"""Operations: health that names what is down, metrics, the keys command, the compose file."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import yaml

from compose.cli import INGRESS_GRACE_S
from compose.gateway import Gateway
from compose.stack import free_port
from state.keys import hash_key
from tests.conftest import eventually
from topics.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


async def test_health_is_ok_when_everything_is_up(http: httpx.AsyncClient) -> None:
    response = await http.get("/v1/health")
    assert response.status_code == 200
    assert response.json()["checks"] == {"kafka": "ok", "redis": "ok", "postgres": "ok"}


async def test_health_is_503_naming_the_dependency_that_is_down(
        gateway: Gateway, tmp_path: Path) -> None:
    redis_port = free_port()
    private_redis = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
        "--dir", str(tmp_path), stdout=asyncio.subprocess.DEVNULL)
    settings = gateway.settings.model_copy(update={
        "redis": gateway.settings.redis.model_copy(
            update={"url": f"redis://127.0.0.1:{redis_port}/0"}),
        "ingress": gateway.settings.ingress.model_copy(update={"port": free_port()}),
    })
    ingress = Gateway(settings, tmp_path)
    try:
        ingress.spawn("ingress", "ingress")
        async with httpx.AsyncClient(base_url=ingress.url, timeout=10) as http:
            await eventually(lambda: _status(http, 200), timeout_s=30)
            private_redis.kill()
            await private_redis.wait()
            response = await eventually(lambda: _status(http, 503), timeout_s=10)
    finally:
        ingress.stop()
        if private_redis.returncode is None:
            private_redis.kill()

    body = response.json()
    # The seed's shape holds on a 503 too: a status other than "ok", the version, the uptime.
    assert body["status"] == "degraded"
    assert isinstance(body["version"], str)
    assert isinstance(body["uptime"], int)
    assert body["uptime_seconds"] == body["uptime"]
    assert body["checks"]["kafka"] == "ok"
    assert body["checks"]["postgres"] == "ok"
    assert body["checks"]["redis"].startswith("down")
    assert body["error"]["code"] == "dependency_down"
    assert "redis" in body["error"]["message"]


async def _status(http: httpx.AsyncClient, status: int) -> httpx.Response | None:
    try:
        response = await http.get("/v1/health")
    except httpx.TransportError:
        return None
    return response if response.status_code == status else None


async def test_metrics_count_requests_by_route_and_status(http: httpx.AsyncClient) -> None:
    await http.post("/v1/chat/completions", json={"model": "nope", "messages": []})
    text = (await http.get("/metrics")).text
    # Refused before its body named a routing mode: mode "none".
    assert any(line.startswith("switchyard_ingress_requests_total{")
               and {'route="/v1/chat/completions"', 'status="422"', 'mode="none"'}
               <= set(line.partition("{")[2].partition("}")[0].split(","))
               and float(line.rpartition(" ")[2]) >= 1 for line in text.splitlines())
    assert "switchyard_ingress_in_flight" in text


async def test_every_response_carries_a_request_id(http: httpx.AsyncClient) -> None:
    for response in (await http.get("/v1/health"), await http.get("/v1/models"),
                     await http.get("/nowhere")):
        assert response.headers["x-request-id"].startswith("req_")


async def test_keys_create_prints_a_working_key_once_and_stores_only_its_hash(
        gateway: Gateway, pg: asyncpg.Pool) -> None:
    env = {**os.environ, **gateway.settings.to_env()}
    command = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compose.cli", "keys", "create", "--tenant", "acme", env=env,
        stdout=asyncio.subprocess.PIPE)
    out, _ = await command.communicate()
    assert command.returncode == 0
    api_key = re.search(r"api key.*: (\S+)", out.decode())
    assert api_key is not None
    key = api_key.group(1)

    async with httpx.AsyncClient(base_url=gateway.url,
                                 headers={"Authorization": f"Bearer {key}"}) as http:
        assert (await http.get("/v1/models")).status_code == 200
    row = await pg.fetchrow("SELECT * FROM api_keys WHERE key_sha256 = $1", hash_key(key))
    assert row is not None
    assert key not in " ".join(str(v) for v in row.values())
    assert await pg.fetchval("SELECT name FROM tenants WHERE id = $1", row["tenant_id"]) == "acme"


def compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())
    return loaded


def test_compose_file_runs_every_process_of_the_local_stack() -> None:
    services = compose_file()["services"]
    assert {"kafka", "redis", "postgres", "init", "ingress", "classifier", "router", "usage",
            "fake-upstream"} <= set(services)
    # By default the routers classify; the classifier stage comes only with its profile.
    assert services["classifier"]["profiles"] == ["split-classifier"]
    assert (services["router"]["environment"]["SWITCHYARD_ROUTER__CLASSIFY_INLINE"]
            == "${SWITCHYARD_ROUTER__CLASSIFY_INLINE:-true}")
    pom = (ROOT / "compose/kafka/pom.xml").read_text()
    kafka_version = re.search(r"<kafka.version>(.+)</kafka.version>", pom)
    assert kafka_version is not None
    assert services["kafka"]["image"] == f"apache/kafka:{kafka_version.group(1)}"
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_compose_file_sets_only_real_settings() -> None:
    known = set(Settings.env_names())
    used = {name for service in compose_file()["services"].values()
            for name in (service.get("environment") or {}) if name.startswith("SWITCHYARD_")}
    assert used, "the compose file configures nothing"
    assert used <= known, used - known


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _compose_plugin(),
                    reason="needs the docker client with its compose plugin (no engine needed)")
def test_docker_compose_accepts_the_file() -> None:
    subprocess.run(["docker", "compose", "-f", str(ROOT / "compose/docker-compose.yml"),
                    "config", "--quiet"], check=True)


def test_compose_file_restarts_every_service_and_waits_out_each_stop() -> None:
    services = compose_file()["services"]
    for name, service in services.items():
        assert service["restart"] == ("no" if name == "init" else "unless-stopped"), name
    settings = Settings()
    # Docker's SIGKILL must not come before the process's own bounded stop is over.
    bound = settings.shutdown_close_timeout_s + 1
    stops = {"router": settings.router.shutdown_grace_s, "usage": settings.usage.shutdown_grace_s,
             "classifier": settings.classifier.shutdown_grace_s, "ingress": INGRESS_GRACE_S}
    for name, grace in stops.items():
        period = services[name]["stop_grace_period"]
        assert float(period.removesuffix("s")) > grace + bound, name
