"""Which endpoint and key serve a model for a tenant: the tenant's own key (bring your own
key) first, then the key configured in the environment, then the offline fallback server.

Tenants' own keys come from the vault (`state/vault.py`), where they are stored over HTTP by
`ingress/vault.py`.

A route of a provider the tenant registered (`topics/tenant_providers.py`) is called on the
base URL the tenant gave, with the key it stored for that provider (in the vault under the
provider's id) or none: never the environment's keys, never the offline fallback."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from topics.catalog import Catalog, Model, TimeoutOverrides
from topics.errors import Unavailable
from topics.tenant_providers import is_tenant_provider
from workers.providers.base import Route, Timeouts

FALLBACK_PROVIDER = "local-fallback"

TenantKeyLookup = Callable[[str, str], Awaitable[str | None]]
CatalogLookup = Callable[[str], Awaitable[Catalog]]  # a tenant's catalog, by tenant id


@dataclass(frozen=True, slots=True)
class RouteConfig:
    provider_keys: Mapping[str, str | None]  # from the environment, read once at start
    base_urls: Mapping[str, str]  # per-provider endpoint overrides
    fallback_url: str | None
    timeouts: Timeouts


class RouteResolver:
    def __init__(self, catalog: Catalog, config: RouteConfig,
                 tenant_key: TenantKeyLookup | None = None,
                 catalogs: CatalogLookup | None = None) -> None:
        self._catalog = catalog
        self._config = config
        self._tenant_key = tenant_key
        self._catalogs = catalogs

    async def resolve(self, model: Model, tenant_id: str) -> Route:
        if is_tenant_provider(model.provider) and self._catalogs is not None:
            return await self._registered(model, tenant_id)
        provider = self._catalog.providers[model.provider]
        base_url = self._config.base_urls.get(model.provider, provider.base_url).rstrip("/")
        key = None
        if self._tenant_key is not None:
            key = await self._tenant_key(tenant_id, model.provider)
        key = key or self._config.provider_keys.get(model.provider)
        timeouts = _timeouts(self._config.timeouts, provider.timeouts, model.timeouts)
        if key:
            return Route(model.provider, provider.dialect, base_url, key, model.upstream_model,
                         timeouts)
        if self._config.fallback_url:
            # Offline development: the fake upstream speaks every dialect on one server.
            fallback = self._config.fallback_url.rstrip("/").removesuffix("/v1")
            suffix = "/v1beta" if provider.dialect == "gemini" else "/v1"
            return Route(FALLBACK_PROVIDER, provider.dialect, fallback + suffix, None,
                         model.upstream_model, timeouts)
        raise Unavailable(f"provider {model.provider!r} has no API key configured "
                          f"(set {provider.api_key_env}, or store a tenant key in the vault)",
                          code="provider_not_configured")


    async def _registered(self, model: Model, tenant_id: str) -> Route:
        provider = (await self._catalogs(tenant_id)).providers.get(model.provider) \
            if self._catalogs is not None else None
        if provider is None:  # deleted or disabled since the decision
            raise Unavailable(f"the tenant's provider {model.provider!r} is no longer "
                              "registered or enabled", code="provider_not_configured",
                              retryable=False)
        key = None
        if self._tenant_key is not None:
            key = await self._tenant_key(tenant_id, model.provider)
        return Route(model.provider, provider.dialect, provider.base_url, key,
                     model.upstream_model, _timeouts(self._config.timeouts))


def _timeouts(base: Timeouts, *overrides: TimeoutOverrides) -> Timeouts:
    """The router's timeouts, overridden by the provider's, then by the model's."""
    values = {name: getattr(base, name) for name in ("connect_s", "ttft_s", "idle_s", "total_s")}
    for override in overrides:
        values |= override.model_dump(exclude_none=True)
    return Timeouts(**values)
