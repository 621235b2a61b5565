"""The metrics list of docs/operations.md, from the metric classes each process registers:
name (as exposed), type, labels, the processes that expose it, help text."""

from __future__ import annotations

from typing import Any, cast

from prometheus_client import CollectorRegistry

from compose.reference.common import require, table

TENANT_NOTE = ("`tenant`: only with `SWITCHYARD_METRICS__TENANT_LABELS=true` "
               "(`metrics.tenant_labels`; off by default: one series per tenant).")


def process_registries() -> dict[str, CollectorRegistry]:
    """Each process's families, registered as the process registers them (the objects they
    are built on are not used: nothing is started)."""
    from ingress.audit import AuditLog
    from ingress.metrics import IngressMetrics
    from ingress.response_cache import CacheMetrics
    from workers.audit.metrics import AuditMetrics
    from workers.classifier.metrics import ClassifierMetrics
    from workers.kafka_metrics import ConsumerMetrics
    from workers.router.budgets import BudgetAlerts
    from workers.router.metrics import RouterMetrics
    from workers.usage.metrics import UsageMetrics

    unused = cast(Any, None)
    out = {name: CollectorRegistry() for name in ("ingress", "router", "usage", "audit",
                                                  "classifier")}
    IngressMetrics(out["ingress"])
    AuditLog(unused, publish_timeout_s=1.0, registry=out["ingress"])
    CacheMetrics(out["ingress"])
    RouterMetrics(out["router"], tenant_labels=True)
    BudgetAlerts(unused, unused, out["router"])
    ClassifierMetrics(out["router"])  # when it classifies inline (the default)
    UsageMetrics(out["usage"])
    AuditMetrics(out["audit"])
    ClassifierMetrics(out["classifier"])
    for name in ("router", "usage", "audit", "classifier"):
        ConsumerMetrics(out[name], "group")
    return out


def metrics_markdown() -> str:
    rows: dict[str, tuple[str, str, str, list[str]]] = {}
    for process, registry in process_registries().items():
        # The metric objects themselves (no public listing): their label names are known
        # before any series exists, which the registry's samples are not.
        for collector in list(registry._collector_to_names):
            kind: str = getattr(collector, "_type", "")
            require(kind in ("counter", "gauge", "histogram", "summary"),
                    f"{collector!r} is not a prometheus_client metric")
            name: str = getattr(collector, "_name")  # noqa: B009
            exposed = f"{name}_total" if kind == "counter" else name
            labels: tuple[str, ...] = getattr(collector, "_labelnames")  # noqa: B009
            doc: str = getattr(collector, "_documentation")  # noqa: B009
            require(bool(doc), f"metric {exposed} has no help text")
            shown = ", ".join(f"`{label}`" + ("\\*" if label == "tenant" else "")
                              for label in labels)
            if exposed in rows:
                rows[exposed][3].append(process)
            else:
                rows[exposed] = (kind, shown, doc, [process])
    lines = table(("metric", "type", "labels", "process", "what"),
                  ((f"`{name}`", kind, labels, ", ".join(processes), doc)
                   for name, (kind, labels, doc, processes) in sorted(rows.items())))
    return "\n".join([*lines, "", f"\\* {TENANT_NOTE}"]) + "\n"
