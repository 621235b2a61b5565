"""The route table is the ingress's one list of routes, and it decides who may call what."""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
import pytest
from starlette.routing import Route

from compose.gateway import Gateway
from ingress.app import create_app
from ingress.call import Endpoint
from ingress.routes import ROUTES, metric_paths
from topics.identity import Permission

INGRESS = Path(__file__).resolve().parents[1] / "ingress"


def _url(path: str) -> str:
    return path.replace("{provider}", "openai")


def test_the_app_serves_exactly_the_route_table() -> None:
    app = create_app()
    served = {(method, route.path) for route in app.routes if isinstance(route, Route)
              for method in route.methods or () if method != "HEAD"}
    assert served == {(e.method, e.path) for e in ROUTES}
    assert len(served) == len(ROUTES), "a method and path listed twice"


def test_every_route_states_the_permission_it_requires() -> None:
    assert all(e.permission is None or isinstance(e.permission, Permission) for e in ROUTES)
    # Login is public: its API key comes in the body, checked by the handler.
    assert {e.path for e in ROUTES if e.permission is None} == {
        "/v1/health", "/healthz", "/readyz", "/metrics", "/v1/auth/login"}


def _callers(attribute: str) -> list[str]:
    return sorted(
        path.name for path in INGRESS.glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == attribute
        and isinstance(node.ctx, ast.Load))


def test_only_the_endpoint_builder_authenticates() -> None:
    """Handlers get their principal from the table's one authentication step; login alone
    checks a key itself, the one that comes in its body."""
    assert _callers("authenticate") == ["call.py"]
    assert _callers("api_key_record") == ["sessions.py"]


def test_templated_paths_share_one_metrics_label() -> None:
    assert "/v1/chat/completions" in metric_paths()
    assert not any("{" in path for path in metric_paths())


@pytest.mark.parametrize("endpoint", [e for e in ROUTES if e.permission is not None],
                         ids=lambda e: f"{e.method} {e.path}")
async def test_an_authenticated_route_refuses_a_caller_without_a_key(
        gateway: Gateway, endpoint: Endpoint) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as anonymous:
        response = await anonymous.request(endpoint.method, _url(endpoint.path), json={})
        wrong = await anonymous.request(endpoint.method, _url(endpoint.path), json={},
                                        headers={"Authorization": "Bearer sy-not-a-key"})
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "missing_api_key"
    assert wrong.status_code == 401, wrong.text
    assert wrong.json()["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("path", ["/v1/health", "/healthz", "/readyz", "/metrics"])
async def test_a_public_route_answers_without_a_key(gateway: Gateway, path: str) -> None:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as anonymous:
        response = await anonymous.get(path)
    assert response.status_code == 200, response.text
