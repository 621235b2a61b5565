"""How a tenant's registered providers become routes of its catalog (`topics/tenant_providers.py`
`tenant_catalog`): the names that reach them, the shared catalog's names kept, priority order,
disabled providers left out, and the declared prices billed."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError

from topics.catalog import Catalog, load_catalog
from topics.tenant_providers import (
    DeclaredModel,
    RegisterProvider,
    TenantProvider,
    resolve_type,
    tenant_catalog,
)

CATALOG = load_catalog(Path(__file__).parent.parent / "topics" / "catalog.toml")


def _provider(pid: str, name: str, *models: str | DeclaredModel, priority: int = 0,
              enabled: bool = True) -> TenantProvider:
    now = datetime.now(UTC)
    declared = tuple(m if isinstance(m, DeclaredModel) else DeclaredModel(name=m)
                     for m in models)
    return TenantProvider(id=pid, tenant_id="t", name=name, type="openai", dialect="openai",
                          base_url="http://h/v1", models=declared, priority=priority,
                          weight=1.0, enabled=enabled, has_key=False, created_at=now,
                          updated_at=now)


def test_no_enabled_provider_leaves_the_shared_catalog_itself() -> None:
    assert tenant_catalog(CATALOG, []) is CATALOG
    assert tenant_catalog(CATALOG, [_provider("tp_1", "a", "m", enabled=False)]) is CATALOG


def test_a_models_routes_are_named_by_id_provider_name_and_bare_name() -> None:
    catalog = tenant_catalog(CATALOG, [_provider("tp_1", "acme", "acme-llm")])
    route = catalog.model("acme-llm")
    assert route is not None
    assert route.id == "tp_1/acme-llm"
    assert catalog.model("acme/acme-llm") is route
    assert catalog.model("tp_1/acme-llm") is route
    assert (route.provider, route.upstream_model) == ("tp_1", "acme-llm")
    assert catalog.providers["tp_1"].base_url == "http://h/v1"
    assert CATALOG.model("acme-llm") is None  # the shared catalog is untouched


def test_the_shared_catalogs_names_stay_its_own() -> None:
    catalog = tenant_catalog(CATALOG, [_provider("tp_1", "proxy", "gpt-4o-mini")])
    shared = catalog.model("gpt-4o-mini")
    assert shared is not None
    assert shared.provider == "openai"
    own = catalog.model("proxy/gpt-4o-mini")
    assert own is not None
    assert own.id == "tp_1/gpt-4o-mini"


def test_a_bare_name_several_providers_serve_names_them_all_by_priority() -> None:
    catalog = tenant_catalog(CATALOG, [_provider("tp_low", "low", "shared-llm", priority=1),
                                       _provider("tp_high", "high", "shared-llm", priority=9)])
    assert catalog.is_shared_name("shared-llm")
    assert [m.id for m in catalog.routes_of("shared-llm")] == ["tp_high/shared-llm",
                                                             "tp_low/shared-llm"]


def test_declared_prices_bill_and_default_to_zero() -> None:
    priced = DeclaredModel.model_validate({"name": "p", "input_per_mtok": "2.00",
                                           "output_per_mtok": 8})
    catalog = tenant_catalog(CATALOG, [_provider("tp_1", "a", priced, "free")])
    paid, free = catalog.model("p"), catalog.model("free")
    assert paid is not None
    assert free is not None
    assert paid.cost_usd(1_000_000, 500_000, 0) == Decimal("6.00")
    assert paid.cached_input_per_mtok == Decimal("2.00")
    assert free.cost_usd(1_000_000, 1_000_000, 0) == 0


def test_a_registration_is_checked() -> None:
    assert RegisterProvider.model_validate(
        {"name": "a", "type": "openai", "base_url": "http://h/v1/", "models": ["m"]}
    ).base_url == "http://h/v1"
    for bad in ({"name": "a b", "type": "openai"},
                {"name": "a", "type": "openai", "base_url": "http://u:p@h/v1"},
                {"name": "a", "type": "openai", "models": ["m", "m"]},
                {"name": "a", "type": "openai", "weight": True},
                {"name": "a", "type": "openai", "models": [{"name": "m", "output_per_mtok": -1}]}):
        with pytest.raises(ValidationError):
            RegisterProvider.model_validate(bad)


def test_type_names_a_dialect_or_a_catalog_provider() -> None:
    assert resolve_type("openai-compatible", "http://h/v1", CATALOG) == ("openai", "http://h/v1")
    assert resolve_type("groq", None, CATALOG) == ("openai", "https://api.groq.com/openai/v1")
    assert resolve_type("anthropic", "http://h/v1", CATALOG)[0] == "anthropic"
    with pytest.raises(ValueError, match="needs a base_url"):
        resolve_type("custom", None, CATALOG)
    with pytest.raises(ValueError, match="unknown type"):
        resolve_type("nope", "http://h/v1", CATALOG)


def test_the_merged_catalog_is_a_valid_catalog() -> None:
    merged = tenant_catalog(CATALOG, [_provider("tp_1", "a", "x", "y")])
    assert isinstance(Catalog.model_validate(merged.model_dump(by_alias=True)), Catalog)
