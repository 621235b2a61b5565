"""The Grafana dashboards and their provisioning (deploy/grafana/): each dashboard is JSON
Grafana can provision (a unique uid, a title, panels that query through the `datasource`
variable), and the provisioning files point at them. That their queries parse and name only
exported metrics: tests/test_prometheus.py, against a real Prometheus and the live processes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
GRAFANA_DIR = ROOT / "deploy" / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel but the rows, those inside collapsed rows included."""
    out = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            out += panel.get("panels", [])
        else:
            out.append(panel)
    return out


def test_the_four_dashboards_are_there() -> None:
    assert [p.stem for p in DASHBOARDS] == [
        "overview", "pipeline-kafka", "providers", "tenants-costs"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_a_dashboard_is_provisionable_json(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"]
    assert len(dashboard["uid"]) <= 40  # Grafana's limit
    assert dashboard["title"].startswith("Switchyard / ")
    assert isinstance(dashboard["schemaVersion"], int)
    # Not bound to one datasource's uid: a variable the viewer (or the default) fills in.
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = _panels(dashboard)
    assert panels
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in panels:
        where = f"{path.name}: panel {panel.get('title')!r}"
        assert panel["title"], where
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}, where
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, where
        assert panel["datasource"] == DATASOURCE, where
        assert panel["targets"], where
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), where
        for target in panel["targets"]:
            assert target["expr"].strip(), where
            assert target["datasource"] == DATASOURCE, where


def test_dashboard_uids_and_titles_are_unique() -> None:
    dashboards = [json.loads(p.read_text()) for p in DASHBOARDS]
    assert len({d["uid"] for d in dashboards}) == len(dashboards)
    assert len({d["title"] for d in dashboards}) == len(dashboards)


def test_provisioning_declares_a_prometheus_datasource_and_the_dashboards() -> None:
    datasources = [yaml.safe_load(p.read_text())
                   for p in (GRAFANA_DIR / "provisioning" / "datasources").glob("*.yml")]
    assert [d["type"] for f in datasources for d in f["datasources"]] == ["prometheus"]
    providers = [yaml.safe_load(p.read_text())
                 for p in (GRAFANA_DIR / "provisioning" / "dashboards").glob("*.yml")]
    (provider,) = [p for f in providers for p in f["providers"]]
    assert provider["type"] == "file"
    assert provider["options"]["path"]
