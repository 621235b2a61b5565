"""Dashboards and alerts, checked by Prometheus itself (deploy/prometheus/, deploy/grafana/):
promtool accepts the scrape configuration and the alerting rules, and the rules pass their unit
tests (deploy/prometheus/alerts_test.yml); a real Prometheus, started here, scrapes every
process of the running stack; and every metric a dashboard or an alert names is one those
processes export. The dashboards' own shape: tests/test_dashboards.py."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from compose.children import wait_http
from compose.gateway import Gateway
from compose.stack import free_port
from tests.conftest import eventually
from tests.local_tools import local_tool

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS_DIR = ROOT / "deploy" / "grafana" / "dashboards"

# A metric name of ours, or of prometheus_client's default collectors, inside a PromQL
# expression (not a label: those are never prefixed so).
_METRIC_NAME = re.compile(r"(?<![\w$:])((?:switchyard|process|python)_[A-Za-z0-9_]+)")


def _promtool(*args: str) -> None:
    done = subprocess.run([local_tool("promtool"), *args], cwd=PROMETHEUS_DIR,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"promtool {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


def test_promtool_accepts_the_scrape_configuration() -> None:
    _promtool("check", "config", "prometheus.yml")


def test_promtool_accepts_the_alerting_rules() -> None:
    _promtool("check", "rules", "alerts.yml")


def test_every_alert_passes_its_unit_tests() -> None:
    _promtool("test", "rules", "alerts_test.yml")


def test_every_alert_has_a_severity_a_summary_and_a_runbook_section() -> None:
    operations = (ROOT / "docs" / "operations.md").read_text()
    anchors = {_anchor(h) for h in re.findall(r"^#+ (.+)$", operations, re.MULTILINE)}
    tested = (PROMETHEUS_DIR / "alerts_test.yml").read_text()
    for rule in _alert_rules():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        assert rule["annotations"]["summary"], name
        assert rule["annotations"]["description"], name
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("docs/operations.md#"), name
        assert runbook.split("#", 1)[1] in anchors, f"{name}: no section {runbook}"
        assert f"alertname: {name}\n" in tested, f"{name} has no unit test in alerts_test.yml"


# --------------------------------------------------------------- a real Prometheus, scraping


@dataclass(frozen=True, slots=True)
class Target:
    job: str
    address: str  # host:port, serving /metrics


@pytest.fixture(scope="module")
async def targets(gateway: Gateway,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[list[Target]]:
    """Every kind of process of the stack, each serving /metrics: the gateway's ingress, and
    one router, usage worker and audit writer started beside the gateway's with their metrics
    ports set (they join the same consumer groups, like the extra routers of other tests)."""
    logs = tmp_path_factory.mktemp("scraped-workers")
    extra = Gateway(gateway.settings, logs, log=lambda _: None)
    found = [Target("switchyard-ingress",
                    f"{gateway.settings.ingress.host}:{gateway.settings.ingress.port}")]
    kinds: list[tuple[str, tuple[str, ...]]] = [
        ("router", ("router",)), ("usage", ("usage",)), ("audit", ("audit", "run"))]
    # A classifier stage only when the stack runs one: beside routers that classify inline it
    # would take their requests (it reads the same consumer group) and forward them to nobody.
    if "classifier" in gateway.processes:
        kinds.append(("classifier", ("classifier",)))
    try:
        for kind, command in kinds:
            port = free_port()
            name = f"{kind}-scraped"
            proc = extra.spawn(name, *command,
                               env={f"SWITCHYARD_{kind.upper()}__METRICS_PORT": str(port)})
            await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/metrics", 60,
                                    extra.log_file(name), proc)
            found.append(Target(f"switchyard-{kind}", f"127.0.0.1:{port}"))
        yield found
    finally:
        await asyncio.to_thread(extra.stop)


@pytest.fixture(scope="module")
def prometheus(targets: list[Target],
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus of its own (temporary directory, free port) scraping `targets` every
    second, with the project's alerting rules loaded; yields its URL. Stopped, and its
    database removed, afterwards."""
    binary = local_tool("prometheus")
    home = tmp_path_factory.mktemp("prometheus")
    jobs: dict[str, list[str]] = {}
    for target in targets:
        jobs.setdefault(target.job, []).append(target.address)
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                   "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": addresses}]}
                           for job, addresses in jobs.items()],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = home / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [binary, f"--config.file={home / 'prometheus.yml'}",
             f"--storage.tsdb.path={home / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", 60, log, proc)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(home / "data", ignore_errors=True)


async def _query(api: httpx.AsyncClient, promql: str) -> list[dict[str, Any]]:
    response = await api.get("/api/v1/query", params={"query": promql})
    response.raise_for_status()
    body = response.json()
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


async def test_prometheus_scrapes_every_process_of_the_stack(
        prometheus: str, targets: list[Target], client: openai.AsyncOpenAI) -> None:
    messages: Any = [{"role": "user", "content": "scrape me"}]
    await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    stream = await client.chat.completions.create(model="gpt-4o-mini", messages=messages,
                                                  stream=True)
    async for _ in stream:
        pass
    expected = {(t.job, t.address) for t in targets}

    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as api:
        async def every_target_up() -> list[dict[str, Any]] | None:
            response = await api.get("/api/v1/targets", params={"state": "active"})
            active: list[dict[str, Any]] = response.json()["data"]["activeTargets"]
            seen = {(t["labels"]["job"], t["labels"]["instance"]): t["health"]
                    for t in active}
            return active if seen == dict.fromkeys(expected, "up") else None

        try:
            await eventually(every_target_up, timeout_s=60, every_s=0.5)
        except AssertionError:
            response = await api.get("/api/v1/targets")
            pytest.fail(f"not every target is up: {json.dumps(response.json(), indent=1)}")

        up = await _query(api, "up")
        assert {(s["metric"]["job"], s["metric"]["instance"]): s["value"][1] for s in up} \
            == dict.fromkeys(expected, "1")

        # What each process exports reaches Prometheus: the requests just made, counted by
        # the ingress, and series of ours from every other process.
        requests = await eventually(lambda: _query(
            api, 'sum(switchyard_ingress_requests_total{route="/v1/chat/completions"})'),
            timeout_s=30)
        assert float(requests[0]["value"][1]) >= 2
        ours = await _query(api, 'count by (job) ({__name__=~"switchyard_.+"})')
        assert {s["metric"]["job"] for s in ours} == {t.job for t in targets}, \
            "a process exports no series of ours"


# Grafana's variables, as Grafana would fill them in, so that Prometheus can parse the query.
_GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$provider": ".*",
                      "$group": ".*"}


def _dashboard_queries() -> Iterator[tuple[str, str, str]]:
    """(dashboard file, panel title, PromQL) of every panel target."""
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield path.name, panel["title"], target["expr"]


async def test_every_dashboard_query_is_one_prometheus_accepts(prometheus: str) -> None:
    rejected = []
    async with httpx.AsyncClient(base_url=prometheus, timeout=10) as api:
        for dashboard, title, expr in _dashboard_queries():
            for variable, value in _GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{dashboard} {title!r}: a variable this test lacks: {expr}"
            response = await api.get("/api/v1/query", params={"query": expr})
            if response.status_code != 200:
                rejected.append(f"{dashboard} {title!r}: {expr}: {response.json()['error']}")
    assert not rejected, "\n".join(rejected)


# ------------------------------------------------- what dashboards and alerts name, exported


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _expressions(node: Any) -> Iterator[str]:
    """Every PromQL string of a dashboard: targets' `expr`, templating variables' `query`."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "query") and isinstance(value, str):
                yield value
            elif isinstance(value, dict) and key == "query" and "query" in value:
                yield str(value["query"])
            else:
                yield from _expressions(value)
    elif isinstance(node, list):
        for item in node:
            yield from _expressions(item)


def referenced_metrics() -> dict[str, set[str]]:
    """Metric name -> the files naming it, over the alerting rules and every dashboard."""
    where: dict[str, set[str]] = {}
    sources: list[tuple[str, list[str]]] = [
        ("deploy/prometheus/alerts.yml", [rule["expr"] for rule in _alert_rules()])]
    for path in sorted(DASHBOARDS_DIR.glob("*.json")):
        sources.append((f"deploy/grafana/dashboards/{path.name}",
                        list(_expressions(json.loads(path.read_text())))))
    for source, expressions in sources:
        for expr in expressions:
            for name in _METRIC_NAME.findall(expr):
                where.setdefault(name, set()).add(source)
    return where


def _exported_names(exposition: str) -> set[str]:
    """The series names a /metrics page can produce: a family listed with no samples yet (a
    labelled metric nobody has incremented) still counts, by its type's suffixes."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names |= {sample.name for sample in family.samples}
        base = family.name
        if family.type == "counter":
            names |= {f"{base}_total", f"{base}_created"}
        elif family.type == "histogram":
            names |= {f"{base}_bucket", f"{base}_count", f"{base}_sum", f"{base}_created"}
        elif family.type == "summary":
            names |= {base, f"{base}_count", f"{base}_sum", f"{base}_created"}
        elif family.type == "info":
            names.add(f"{base}_info")
        else:
            names.add(base)
    return names


async def test_dashboards_and_alerts_name_only_metrics_the_processes_export(
        targets: list[Target]) -> None:
    exported: set[str] = set()
    async with httpx.AsyncClient(timeout=10) as http:
        for target in targets:
            response = await http.get(f"http://{target.address}/metrics")
            response.raise_for_status()
            exported |= _exported_names(response.text)
    referenced = referenced_metrics()
    assert referenced, "no metric names found in the dashboards and alerts"
    missing = {name: sorted(files) for name, files in sorted(referenced.items())
               if name not in exported}
    assert not missing, ("named by dashboards or alerts but exported by no process of the "
                         f"stack:\n{json.dumps(missing, indent=1)}")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")
