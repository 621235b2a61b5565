"""The Helm chart (deploy/helm/switchyard): it lints, renders objects Kubernetes' own schemas
accept (kubeconform -strict, schemas from compose/kube_schemas.py), gives every process the
contract's probes, ports and resources, keeps secrets out of plain env, runs migrations as a
hook, and runs the same processes with the same settings as compose/docker-compose.yml.

helm and kubeconform come from compose/bootstrap.sh (.tools/bin); missing, these tests skip
locally and fail under CI (CI=true), where the bootstrap ran.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from compose.cli import INGRESS_GRACE_S
from compose.kube_schemas import KUBERNETES_VERSION, schema_dir, schema_location

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "deploy/helm/switchyard"
ALL_ON = CHART / "ci/all-on-values.yaml"
KEDA = CHART / "ci/keda-values.yaml"
RELEASE = "sy"

# The contract (issue 19): each process's command, its probe port, its settings section.
PROCESSES = {
    "ingress": (["ingress"], 8080, "INGRESS"),
    "router": (["router"], 9101, "ROUTER"),
    "usage": (["usage"], 9102, "USAGE"),
    "audit": (["audit", "run"], 9103, "AUDIT"),
    "classifier": (["classifier"], 9104, "CLASSIFIER"),
}
WORKER_SECTIONS = {"ROUTER", "USAGE", "AUDIT", "CLASSIFIER"}


def _missing(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why, pytrace=False)
    pytest.skip(why)


def _tool(name: str) -> str:
    local = ROOT / ".tools/bin" / name
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    found = shutil.which(name)
    if found is None:
        _missing(f"{name} not found in .tools/bin nor on PATH: run `make bootstrap` "
                 "(compose/bootstrap.sh builds it with go install)")
    assert found is not None
    return found


@pytest.fixture(scope="module")
def helm() -> str:
    return _tool("helm")


@pytest.fixture(scope="module")
def kubeconform() -> str:
    path = _tool("kubeconform")
    if not (schema_dir() / "deployment-apps-v1.json").is_file():
        _missing(f"no Kubernetes JSON schemas in {schema_dir()}: run `make bootstrap` "
                 "(python -m compose.kube_schemas)")
    return path


def _template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [helm, "template", RELEASE, str(CHART), "--kube-version", KUBERNETES_VERSION, *args],
        capture_output=True, text=True)


def render(helm: str, *args: str) -> str:
    done = _template(helm, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def default_objects(helm: str) -> list[dict[str, Any]]:
    return objects(render(helm))


@pytest.fixture(scope="module")
def all_on_text(helm: str) -> str:
    return render(helm, "-f", str(ALL_ON))


@pytest.fixture(scope="module")
def all_on(all_on_text: str) -> list[dict[str, Any]]:
    return objects(all_on_text)


def of_kind(objs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    """Objects of a kind by component label (or name)."""
    found = {}
    for obj in objs:
        if obj["kind"] == kind:
            labels = obj["metadata"].get("labels", {})
            found[labels.get("app.kubernetes.io/component", obj["metadata"]["name"])] = obj
    return found


def container(workload: dict[str, Any]) -> dict[str, Any]:
    (only,) = workload["spec"]["template"]["spec"]["containers"]
    result: dict[str, Any] = only
    return result


def env_of(workload: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(workload).get("env", [])}


def plain(env: dict[str, dict[str, Any]], name: str) -> str:
    value: str = env[name]["value"]
    return value


# --- The tools' verdicts ----------------------------------------------------------------------

@pytest.mark.parametrize("values", [None, ALL_ON, KEDA], ids=["default", "all-on", "keda"])
def test_helm_lint_passes(helm: str, values: Path | None) -> None:
    extra = ["-f", str(values)] if values else []
    done = subprocess.run([helm, "lint", "--strict", str(CHART), *extra],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("values", [None, ALL_ON, KEDA], ids=["default", "all-on", "keda"])
def test_rendered_objects_are_valid_kubernetes(helm: str, kubeconform: str,
                                               values: Path | None,
                                               tmp_path: Path) -> None:
    extra = ["-f", str(values)] if values else []
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(helm, *extra))
    kinds = [obj["kind"] for obj in objects(rendered.read_text())]
    # KEDA's ScaledObject is a custom resource: no schema of Kubernetes' own describes it.
    done = subprocess.run(
        [kubeconform, "-strict", "-summary", "-skip", "ScaledObject",
         "-schema-location", schema_location(), str(rendered)],
        capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    validated = len([k for k in kinds if k != "ScaledObject"])
    assert f"Valid: {validated}, Invalid: 0, Errors: 0" in done.stdout, done.stdout


def test_kubeconform_rejects_what_kubernetes_would(kubeconform: str, tmp_path: Path) -> None:
    # The schemas are strict and really loaded: an unknown field fails, not skips.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"},
        "spec": {"selector": {"matchLabels": {"a": "b"}},
                 "template": {"metadata": {"labels": {"a": "b"}},
                              "spec": {"containers": [{"name": "c", "image": "i",
                                                       "livenessprobe": {}}]}}}}))
    done = subprocess.run([kubeconform, "-strict", "-schema-location", schema_location(),
                           str(bad)], capture_output=True, text=True)
    assert done.returncode == 1
    assert "livenessprobe" in done.stdout


# --- What each process gets -------------------------------------------------------------------

def test_every_process_has_the_contract_probes_port_command_and_resources(
        all_on: list[dict[str, Any]]) -> None:
    deployments = of_kind(all_on, "Deployment")
    assert set(deployments) == set(PROCESSES) | {"fake-upstream"}
    for component, (args, port, section) in PROCESSES.items():
        pod = deployments[component]["spec"]["template"]
        c = container(deployments[component])
        assert c["args"] == args, component
        assert [p["containerPort"] for p in c["ports"]] == [port], component
        for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                            ("startupProbe", "/healthz")):
            assert c[probe]["httpGet"] == {"path": path, "port": port}, (component, probe)
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(c["resources"][kind]), component
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
        assert pod["metadata"]["annotations"]["prometheus.io/path"] == "/metrics"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        env = env_of(deployments[component])
        if section in WORKER_SECTIONS:
            assert plain(env, f"SWITCHYARD_{section}__METRICS_PORT") == str(port)
            assert plain(env, f"SWITCHYARD_{section}__METRICS_HOST") == "0.0.0.0"
        else:
            assert plain(env, "SWITCHYARD_INGRESS__PORT") == str(port)
        assert plain(env, "SWITCHYARD_LOG_FORMAT") == "json"
        assert plain(env, "OTEL_TRACES_EXPORTER") == "otlp"


def test_every_deployment_has_a_disruption_budget(all_on: list[dict[str, Any]]) -> None:
    budgets = of_kind(all_on, "PodDisruptionBudget")
    assert set(budgets) == set(PROCESSES)
    for component, budget in budgets.items():
        assert (budget["spec"]["selector"]["matchLabels"]
                == of_kind(all_on, "Deployment")[component]["spec"]["selector"]["matchLabels"])


def test_the_pods_grace_period_outlasts_each_process_drain(
        all_on: list[dict[str, Any]]) -> None:
    for component, deployment in of_kind(all_on, "Deployment").items():
        if component == "fake-upstream":
            continue
        spec = deployment["spec"]["template"]["spec"]
        env = env_of(deployment)
        close = float(plain(env, "SWITCHYARD_SHUTDOWN_CLOSE_TIMEOUT_S"))
        section = PROCESSES[component][2]
        if section in WORKER_SECTIONS:
            drain = float(plain(env, f"SWITCHYARD_{section}__SHUTDOWN_GRACE_S"))
        else:
            pre_stop = container(deployment)["lifecycle"]["preStop"]["exec"]["command"]
            drain = INGRESS_GRACE_S + float(pre_stop[-1])
        assert spec["terminationGracePeriodSeconds"] >= drain + close + 1, component


def test_a_grace_period_shorter_than_the_drain_is_refused(helm: str) -> None:
    done = _template(helm, "--set", "router.terminationGracePeriodSeconds=10")
    assert done.returncode != 0
    assert "router.terminationGracePeriodSeconds" in done.stderr


def test_by_default_routers_classify_and_scale_on_their_groups_lag(
        default_objects: list[dict[str, Any]]) -> None:
    deployments = of_kind(default_objects, "Deployment")
    assert set(deployments) == {"ingress", "router", "usage", "audit"}
    assert plain(env_of(deployments["router"]), "SWITCHYARD_ROUTER__CLASSIFY_INLINE") == "true"
    hpas = of_kind(default_objects, "HorizontalPodAutoscaler")
    assert set(hpas) == {"ingress", "router", "usage"}
    (cpu,) = hpas["ingress"]["spec"]["metrics"]
    assert cpu["resource"]["name"] == "cpu"
    # Routers that classify inline read llm.requests in the group "classifier" (topics/names.py).
    for component, group in (("router", "classifier"), ("usage", "usage")):
        (lag,) = hpas[component]["spec"]["metrics"]
        assert lag["type"] == "External"
        assert lag["external"]["metric"] == {
            "name": "switchyard_kafka_consumer_lag",
            "selector": {"matchLabels": {"group": group}}}
        assert lag["external"]["target"]["type"] == "AverageValue"
        # An autoscaler owns the replica count.
        assert "replicas" not in deployments[component]["spec"]
    assert of_kind(default_objects, "ScaledObject") == {}


def test_the_classifier_stage_switches_the_routers_to_llm_classified(
        all_on: list[dict[str, Any]]) -> None:
    deployments = of_kind(all_on, "Deployment")
    assert plain(env_of(deployments["router"]), "SWITCHYARD_ROUTER__CLASSIFY_INLINE") == "false"
    hpas = of_kind(all_on, "HorizontalPodAutoscaler")
    groups = {c: hpas[c]["spec"]["metrics"][0]["external"]["metric"]["selector"]["matchLabels"]
              ["group"] for c in ("router", "usage", "classifier")}
    assert groups == {"router": "router", "usage": "usage", "classifier": "classifier"}


def test_keda_replaces_the_lag_autoscalers(helm: str) -> None:
    objs = objects(render(helm, "-f", str(KEDA)))
    assert set(of_kind(objs, "HorizontalPodAutoscaler")) == {"ingress"}
    scaled = of_kind(objs, "ScaledObject")
    assert set(scaled) == {"router", "usage", "classifier"}
    trigger = scaled["router"]["spec"]["triggers"][0]
    assert trigger["type"] == "prometheus"
    assert trigger["metadata"]["query"] == 'sum(switchyard_kafka_consumer_lag{group="router"})'


def test_an_autoscaler_may_not_outgrow_the_partitions(helm: str) -> None:
    done = _template(helm, "--set", "router.autoscaling.maxReplicas=7")
    assert done.returncode != 0
    assert "kafka.requestPartitions" in done.stderr


# --- Migrations and secrets -------------------------------------------------------------------

def test_migrations_run_as_a_hook_before_install_and_upgrade(
        all_on: list[dict[str, Any]]) -> None:
    (job,) = [o for o in all_on if o["kind"] == "Job"]
    hooks = job["metadata"]["annotations"]
    assert hooks["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert container(job)["args"] == ["init"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "Never"
    owner = env_of(job)["SWITCHYARD_POSTGRES__OWNER_DSN"]["valueFrom"]["secretKeyRef"]
    # Its Secret is a hook too, made before it (a lower weight): the release's own Secrets do
    # not exist yet at pre-install.
    (init_secret,) = [o for o in all_on if o["kind"] == "Secret"
                      and o["metadata"]["name"] == owner["name"]]
    secret_hooks = init_secret["metadata"]["annotations"]
    assert secret_hooks["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert int(secret_hooks["helm.sh/hook-weight"]) < int(hooks["helm.sh/hook-weight"])
    assert "hook-succeeded" in secret_hooks["helm.sh/hook-delete-policy"]
    # Only the Job has the owner's DSN.
    for deployment in of_kind(all_on, "Deployment").values():
        assert "SWITCHYARD_POSTGRES__OWNER_DSN" not in env_of(deployment)


def _secret_values() -> list[str]:
    values = yaml.safe_load(ALL_ON.read_text())
    found = [values["secrets"]["vaultMasterKeys"], values["secrets"]["authSigningKeys"],
             values["redis"]["url"], values["postgres"]["dsn"], values["postgres"]["ownerDsn"],
             *values["providerKeys"]["values"].values()]
    return [str(v) for v in found]


def test_no_secret_value_appears_outside_a_secret(all_on: list[dict[str, Any]]) -> None:
    secrets = _secret_values()
    for obj in all_on:
        if obj["kind"] == "Secret":
            continue
        dumped = yaml.safe_dump(obj)
        for value in secrets:
            assert value not in dumped, (obj["kind"], obj["metadata"]["name"])
    sensitive = re.compile(r"_API_KEY$|__MASTER_KEYS$|__SIGNING_KEYS$|__DSN$|__OWNER_DSN$|"
                           r"__URL$")
    for obj in all_on:
        if obj["kind"] not in ("Deployment", "Job"):
            continue
        for name, entry in env_of(obj).items():
            if sensitive.search(name) and name != "SWITCHYARD_FALLBACK_UPSTREAM_URL":
                assert "value" not in entry, (obj["metadata"]["name"], name)
                assert "secretKeyRef" in entry["valueFrom"], (obj["metadata"]["name"], name)


def test_the_operators_own_secrets_replace_the_charts(helm: str) -> None:
    objs = objects(render(helm, "--set", "connections.existingSecret=db",
                          "--set", "secrets.existingSecret=masters",
                          "--set", "providerKeys.existingSecret=providers",
                          "--set", "migrations.existingSecret=owner"))
    assert [o for o in objs if o["kind"] == "Secret"] == []
    router = env_of(of_kind(objs, "Deployment")["router"])
    assert router["SWITCHYARD_POSTGRES__DSN"]["valueFrom"]["secretKeyRef"]["name"] == "db"
    assert router["SWITCHYARD_VAULT__MASTER_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "masters"
    assert router["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "providers"
    (job,) = [o for o in objs if o["kind"] == "Job"]
    job_env = env_of(job)
    assert job_env["SWITCHYARD_POSTGRES__OWNER_DSN"]["valueFrom"]["secretKeyRef"]["name"] == "owner"
    assert job_env["SWITCHYARD_POSTGRES__DSN"]["valueFrom"]["secretKeyRef"]["name"] == "db"


def test_the_provider_keys_are_every_provider_of_the_catalog() -> None:
    catalog = tomllib.loads((ROOT / "topics/catalog.toml").read_text())
    wanted = {p["api_key_env"] for p in catalog["providers"].values()}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values["providerKeys"]["envNames"]) == wanted


# --- The chart and the compose file run the same thing ----------------------------------------

def _compose_processes() -> dict[tuple[str, ...], dict[str, Any]]:
    services = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())["services"]
    return {tuple(s["command"]): s for s in services.values()
            if s.get("image") == "switchyard:dev"}


def _chart_processes(objs: list[dict[str, Any]]) -> dict[tuple[str, ...], dict[str, Any]]:
    return {tuple(container(o)["args"]): o for o in objs if o["kind"] in ("Deployment", "Job")}


def _default(value: Any) -> str | None:
    """What a compose value is when the shell sets nothing: `${X:-d}` is d, a bare name unset."""
    if value is None:
        return None
    match = re.fullmatch(r"\$\{\w+:-(.*)\}", str(value))
    return match.group(1) if match else str(value)


def _own(names: set[str], section: str) -> set[str]:
    # Compose gives every process every worker's metrics port (one shared block); each reads
    # only its own section's.
    return {n for n in names
            if not any(n.startswith(f"SWITCHYARD_{s}__METRICS_") for s in WORKER_SECTIONS
                       if s != section)}


def test_compose_and_the_chart_run_the_same_processes(all_on: list[dict[str, Any]]) -> None:
    assert set(_compose_processes()) == set(_chart_processes(all_on))


def test_compose_and_the_chart_give_each_process_the_same_settings(
        default_objects: list[dict[str, Any]], all_on: list[dict[str, Any]]) -> None:
    compose = _compose_processes()
    chart = _chart_processes(all_on)
    # Values as both ship them: the chart's defaults (the classifier, off by default, from
    # the all-on render) against compose's with nothing set in the shell.
    values = chart | _chart_processes(default_objects)
    sections = {tuple(args): section for args, _, section in PROCESSES.values()}
    sections[("init",)] = "INIT"
    for command, section in sections.items():
        compose_env = compose[command]["environment"]
        chart_env = env_of(chart[command])
        assert _own(set(compose_env), section) == _own(set(chart_env), section), command
        for name, entry in env_of(values[command]).items():
            if "value" not in entry or name.startswith("OTEL_"):
                continue  # secrets, and the all-on values' tracing, differ by design
            same = re.search(r"METRICS_|SHUTDOWN|__HOST$|__PORT$|LOG_|CLASSIFY_INLINE|"
                             r"PARTITIONS", name)
            if same and name in compose_env:
                assert _default(compose_env[name]) == entry["value"], (command, name)
    # Docker's stop_grace_period is the pod's terminationGracePeriodSeconds.
    default_grace = yaml.safe_load((ROOT / "compose/docker-compose.yml").read_text())[
        "x-switchyard"]["stop_grace_period"]
    for command, workload in chart.items():
        if workload["kind"] != "Deployment" or command[0] == "fake-upstream":
            continue
        period = compose[command].get("stop_grace_period", default_grace)
        assert (workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                == int(period.removesuffix("s"))), command


def test_compose_and_the_chart_probe_the_same_endpoints(all_on: list[dict[str, Any]]) -> None:
    compose = _compose_processes()
    for args, port, _ in PROCESSES.values():
        check = " ".join(compose[tuple(args)]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in check, args
