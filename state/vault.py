"""Tenants' own provider API keys, encrypted at rest with AES-256-GCM.

Each row names the master key that encrypted it, so a new master key can be rolled in beside
the old one and rows re-encrypted at leisure (`reencrypt_all`). The associated data binds a
ciphertext to its (tenant, provider): copied to another row, it no longer decrypts. The key
itself is never stored in clear, never returned (its last four characters only), never logged.

The other files of the feature: `ingress/vault.py` serves /v1/vault/keys, where tenants store
and rotate their keys; `workers/router/routes.py` calls a provider with the tenant's own key
first (`TenantKeys.key_for`, wired in by workers/router/main.py); `compose/cli.py`
(`switchyard vault`) rolls master keys, which `topics/settings.py` (`VaultSettings`) holds.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from state.cache import ReadThroughCache
from state.tenancy import platform_scope, tenant_scope
from topics.errors import NotFound, SwitchyardError, Unavailable
from topics.keyring import KEY_ID, parse_keyring
from topics.settings import VaultSettings

KEY_BYTES = 32
NONCE_BYTES = 12  # 96 bits: GCM's native nonce size, random per encryption
MASTER_KEYS_ENV = "SWITCHYARD_VAULT__MASTER_KEYS"
ACTIVE_KEY_ENV = "SWITCHYARD_VAULT__ACTIVE_KEY_ID"
_HEX_KEY = re.compile(r"[0-9a-fA-F]{64}")
_AAD_VERSION = b"switchyard.provider_keys.v1"
_COLUMNS = ("tenant_id, provider, master_key_id, nonce, last4, config, created_at,"
            " rotated_at")


def vault_not_configured() -> Unavailable:
    return Unavailable(
        f"the key vault is not configured: set {MASTER_KEYS_ENV} (e.g. 'k1:<32 bytes in "
        f"base64url>'; `switchyard vault new-master-key` prints one) and {ACTIVE_KEY_ENV}",
        code="vault_not_configured", retryable=False)


def _misconfigured(message: str) -> SwitchyardError:
    return SwitchyardError(message, code="vault_misconfigured")


def _decode_key(key_id: str, text: str) -> bytes:
    """32 bytes from hex (64 digits) or base64url (padding optional)."""
    try:
        raw = (bytes.fromhex(text) if _HEX_KEY.fullmatch(text) else
               base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        # Never echo the value: a near-miss of a master key is still most of a master key.
        raise _misconfigured(f"master key {key_id!r} in {MASTER_KEYS_ENV} is not {KEY_BYTES} "
                             "bytes in base64url or hex")
    return raw


class MasterKeys:
    """The configured master keys by id; new encryptions always use the active one."""

    __slots__ = ("_ciphers", "active_id")

    def __init__(self, keys: Mapping[str, bytes], active_id: str) -> None:
        if active_id not in keys:
            raise _misconfigured(f"{ACTIVE_KEY_ENV}={active_id!r} names no key in "
                                 f"{MASTER_KEYS_ENV} (configured: {', '.join(keys) or 'none'})")
        if any(len(k) != KEY_BYTES for k in keys.values()):
            raise _misconfigured(f"every master key must be {KEY_BYTES} bytes")
        # Only the cipher objects are kept: they do not print their key.
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.active_id = active_id

    @classmethod
    def parse(cls, spec: str, active_id: str) -> MasterKeys:
        """From "k1:<key>,k2:<key>" (`topics/keyring.py`)."""
        keys = parse_keyring(spec, env=MASTER_KEYS_ENV, example="k1:<key>", what="master key",
                             decode=_decode_key, misconfigured=_misconfigured)
        return cls(keys, active_id.strip())

    @classmethod
    def from_settings(cls, vault: VaultSettings) -> MasterKeys | None:
        """None when no master key is configured (the vault then answers 503)."""
        spec = vault.master_keys.get_secret_value()
        return cls.parse(spec, vault.active_key_id) if spec.strip() else None

    @staticmethod
    def generate(key_id: str) -> str:
        """A fresh random master key in the environment's format: "<id>:<base64url>"."""
        if not KEY_ID.fullmatch(key_id):
            raise ValueError("a master key id is letters, digits, '_', '.' or '-'")
        return f"{key_id}:{base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode().rstrip('=')}"

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(self._ciphers)

    def encrypt(self, tenant_id: str, provider: str, api_key: str) -> tuple[str, bytes, bytes]:
        """(master key id, nonce, ciphertext) of `api_key` for this row."""
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.active_id].encrypt(
            nonce, api_key.encode(), _aad(tenant_id, provider))
        return self.active_id, nonce, sealed

    def decrypt(self, tenant_id: str, provider: str, master_key_id: str, nonce: bytes,
                ciphertext: bytes) -> str:
        cipher = self._ciphers.get(master_key_id)
        if cipher is None:
            raise Unavailable(
                f"the stored {provider!r} key of tenant {tenant_id!r} is encrypted under master "
                f"key {master_key_id!r}, which is not configured; add it to {MASTER_KEYS_ENV}",
                code="master_key_not_configured", retryable=False)
        try:
            return cipher.decrypt(nonce, ciphertext, _aad(tenant_id, provider)).decode()
        except InvalidTag:
            raise SwitchyardError(
                f"the stored {provider!r} key of tenant {tenant_id!r} does not decrypt under "
                f"master key {master_key_id!r} (wrong key material, or the row was altered)",
                code="vault_decrypt_failed") from None

    def __repr__(self) -> str:
        return f"MasterKeys(ids={list(self._ciphers)!r}, active_id={self.active_id!r})"


def _aad(tenant_id: str, provider: str) -> bytes:
    # NUL-separated: ids cannot contain NUL, so no two (tenant, provider) pairs collide.
    return b"\x00".join((_AAD_VERSION, tenant_id.encode(), provider.encode()))


def key_version_id(nonce: bytes) -> str:
    """The id of one stored version of a key: every write of a row (store, replace, rotate,
    re-encryption under another master key) draws a fresh random nonce, so a digest of the
    nonce names the version without a column of its own, and changes exactly when the stored
    ciphertext does. A digest, not the nonce: the API has no business showing crypto
    material, and the id's form stays free to change."""
    return "pk_" + hashlib.sha256(nonce).hexdigest()[:24]


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, repr=False)
class StoredKey:
    """What may be shown of a stored key: never the key, only its last four characters."""

    tenant_id: str
    provider: str
    key_id: str  # this version of the stored key (`key_version_id`)
    last4: str
    config: dict[str, Any]
    master_key_id: str
    created_at: datetime
    rotated_at: datetime | None

    def public(self) -> dict[str, Any]:
        """The API's view, the seed product's key object `{provider, key_id, created_at,
        rotated_at}` (RFC 3339 times, or null) plus `last4` and `config`; no master key id."""
        return {"object": "vault.key", "provider": self.provider, "key_id": self.key_id,
                "last4": self.last4, "config": self.config,
                "created_at": _rfc3339(self.created_at),
                "rotated_at": None if self.rotated_at is None else _rfc3339(self.rotated_at)}

    def __repr__(self) -> str:
        # Config values are the tenant's; only their names are printed.
        return (f"StoredKey(tenant_id={self.tenant_id!r}, provider={self.provider!r}, "
                f"last4={self.last4!r}, config_keys={sorted(self.config)!r}, "
                f"master_key_id={self.master_key_id!r})")


def _stored(row: asyncpg.Record) -> StoredKey:
    return StoredKey(tenant_id=row["tenant_id"], provider=row["provider"],
                     key_id=key_version_id(row["nonce"]), last4=row["last4"],
                     config=orjson.loads(row["config"]), master_key_id=row["master_key_id"],
                     created_at=row["created_at"], rotated_at=row["rotated_at"])


def no_stored_key(provider: str) -> NotFound:
    return NotFound(f"no key is stored for provider {provider!r}; POST /v1/vault/keys "
                    "stores one", code="provider_key_not_found", param="provider")


async def put_key(pool: asyncpg.Pool, keys: MasterKeys, tenant_id: str, provider: str,
                  api_key: str, config: dict[str, Any]) -> StoredKey:
    """Store the tenant's key for `provider`, replacing any earlier one (created_at kept)."""
    master_id, nonce, sealed = keys.encrypt(tenant_id, provider, api_key)
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "INSERT INTO provider_keys (tenant_id, provider, master_key_id, nonce, ciphertext,"
            " last4, config) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb)"
            " ON CONFLICT (tenant_id, provider) DO UPDATE SET"
            " master_key_id = EXCLUDED.master_key_id, nonce = EXCLUDED.nonce,"
            " ciphertext = EXCLUDED.ciphertext, last4 = EXCLUDED.last4,"
            f" config = EXCLUDED.config, rotated_at = now() RETURNING {_COLUMNS}",
            tenant_id, provider, master_id, nonce, sealed, api_key[-4:],
            orjson.dumps(config).decode())
    assert row is not None
    return _stored(row)


async def rotate_key(pool: asyncpg.Pool, keys: MasterKeys, tenant_id: str, provider: str,
                     api_key: str) -> StoredKey:
    """Replace the key of a provider that already has one (config kept); NotFound if none."""
    master_id, nonce, sealed = keys.encrypt(tenant_id, provider, api_key)
    async with tenant_scope(pool, tenant_id) as conn:
        row = await conn.fetchrow(
            "UPDATE provider_keys SET master_key_id = $3, nonce = $4, ciphertext = $5,"
            " last4 = $6, rotated_at = now() WHERE tenant_id = $1 AND provider = $2"
            f" RETURNING {_COLUMNS}",
            tenant_id, provider, master_id, nonce, sealed, api_key[-4:])
    if row is None:
        raise no_stored_key(provider)
    return _stored(row)


async def reencrypt_key(pool: asyncpg.Pool, keys: MasterKeys, tenant_id: str,
                        provider: str) -> StoredKey:
    """Rotate without a new key (the seed product's body-less rotate): the stored key, as it
    is, encrypted again under the active master key with a fresh nonce, so a new `key_id`.
    NotFound if none is stored; a row under a master key no longer configured cannot be
    read, and says so (503 `master_key_not_configured`)."""
    async with tenant_scope(pool, tenant_id) as conn:
        # FOR UPDATE: a concurrent replace waits, instead of being overwritten by the old key.
        row = await conn.fetchrow(
            "SELECT master_key_id, nonce, ciphertext FROM provider_keys"
            " WHERE tenant_id = $1 AND provider = $2 FOR UPDATE", tenant_id, provider)
        if row is None:
            raise no_stored_key(provider)
        plain = keys.decrypt(tenant_id, provider, row["master_key_id"], row["nonce"],
                             row["ciphertext"])
        master_id, nonce, sealed = keys.encrypt(tenant_id, provider, plain)
        updated = await conn.fetchrow(
            "UPDATE provider_keys SET master_key_id = $3, nonce = $4, ciphertext = $5,"
            " rotated_at = now() WHERE tenant_id = $1 AND provider = $2"
            f" RETURNING {_COLUMNS}", tenant_id, provider, master_id, nonce, sealed)
    assert updated is not None  # the row is locked by this transaction
    return _stored(updated)


async def delete_key(pool: asyncpg.Pool, tenant_id: str, provider: str) -> None:
    async with tenant_scope(pool, tenant_id) as conn:
        deleted = await conn.fetchval(
            "DELETE FROM provider_keys WHERE tenant_id = $1 AND provider = $2"
            " RETURNING provider", tenant_id, provider)
    if deleted is None:
        raise no_stored_key(provider)


async def list_keys(pool: asyncpg.Pool, tenant_id: str) -> list[StoredKey]:
    async with tenant_scope(pool, tenant_id) as conn:
        rows = await conn.fetch(
            f"SELECT {_COLUMNS} FROM provider_keys WHERE tenant_id = $1 ORDER BY provider",
            tenant_id)
    return [_stored(row) for row in rows]


async def reencrypt_all(pool: asyncpg.Pool, keys: MasterKeys, *, batch_size: int = 500) -> int:
    """Move every row not under the active master key to it; returns the rows changed. Every
    tenant's rows: for the owner role (`switchyard vault reencrypt`), in `platform_scope`.

    Batches walk the primary key, so rows skipped (changed by a writer since they were read:
    their nonce no longer matches) are not re-read forever; such a writer used a master key
    of its own choosing, and a second run picks up whatever is still under an old key."""
    changed = 0
    after: tuple[str, str] = ("", "")
    while True:
        async with platform_scope(pool) as conn:
            rows = await conn.fetch(
                "SELECT tenant_id, provider, master_key_id, nonce, ciphertext FROM provider_keys"
                " WHERE master_key_id <> $1 AND (tenant_id, provider) > ($2, $3)"
                " ORDER BY tenant_id, provider LIMIT $4",
                keys.active_id, *after, batch_size)
        if not rows:
            return changed
        columns: tuple[list[Any], ...] = ([], [], [], [], [], [])
        for row in rows:
            plain = keys.decrypt(row["tenant_id"], row["provider"], row["master_key_id"],
                                 row["nonce"], row["ciphertext"])
            _, nonce, sealed = keys.encrypt(row["tenant_id"], row["provider"], plain)
            values = (row["tenant_id"], row["provider"], row["master_key_id"], row["nonce"],
                      nonce, sealed)
            for column, value in zip(columns, values, strict=True):
                column.append(value)
        # One statement per batch; the nonce is the row's version (fresh at every write).
        async with platform_scope(pool) as conn:
            updated = await conn.fetch(
                "UPDATE provider_keys AS p SET master_key_id = $1, nonce = u.new_nonce,"
                " ciphertext = u.new_ciphertext"
                " FROM unnest($2::text[], $3::text[], $4::text[], $5::bytea[], $6::bytea[],"
                " $7::bytea[]) AS u(tenant_id, provider, old_key_id, old_nonce, new_nonce,"
                " new_ciphertext)"
                " WHERE p.tenant_id = u.tenant_id AND p.provider = u.provider"
                " AND p.master_key_id = u.old_key_id AND p.nonce = u.old_nonce"
                " RETURNING p.provider",
                keys.active_id, *columns)
        changed += len(updated)
        after = (rows[-1]["tenant_id"], rows[-1]["provider"])


async def rows_by_master_key(pool: asyncpg.Pool) -> dict[str, int]:
    """How many stored keys each master key encrypts: an old key may go once it has none.
    Every tenant's rows: for the owner role, like `reencrypt_all`."""
    async with platform_scope(pool) as conn:
        rows = await conn.fetch(
            "SELECT master_key_id, count(*) AS n FROM provider_keys GROUP BY 1 ORDER BY 1")
    return {row["master_key_id"]: row["n"] for row in rows}


class TenantKeys:
    """The router's reader: a tenant's decrypted key for a provider, cached in-process for
    `ttl_s`, absent keys too, concurrent misses sharing one read (see `ReadThroughCache`)."""

    def __init__(self, pool: asyncpg.Pool, keys: MasterKeys | None, *, ttl_s: float,
                 max_entries: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._pool = pool
        self._keys = keys
        self._cache: ReadThroughCache[tuple[str, str], str | None] = ReadThroughCache(
            self._load, ttl_s=ttl_s, max_entries=max_entries, clock=clock)

    async def key_for(self, tenant_id: str, provider: str) -> str | None:
        """The tenant's own key for `provider`, or None if it stored none. A stored key that
        cannot be decrypted raises rather than returning None: falling back to the gateway's
        own key would bill the wrong account."""
        return await self._cache.get((tenant_id, provider))

    def invalidate(self, tenant_id: str, provider: str) -> None:
        self._cache.invalidate((tenant_id, provider))

    # The revocation broadcast's hooks (`state/revocations.py` `Revocable`): a tenant's own
    # provider changed (`ingress/tenant_providers.py`), its key perhaps with it.
    def drop_key(self, key_id: str) -> None:
        pass

    def drop_tenant(self, tenant_id: str) -> None:
        self._cache.invalidate_where(lambda slot: slot[0] == tenant_id)

    def drop_all(self) -> None:
        self._cache.clear()

    async def _load(self, slot: tuple[str, str]) -> str | None:
        async with tenant_scope(self._pool, slot[0]) as conn:
            row = await conn.fetchrow(
                "SELECT master_key_id, nonce, ciphertext FROM provider_keys"
                " WHERE tenant_id = $1 AND provider = $2", *slot)
        if row is None:
            return None
        if self._keys is None:
            raise vault_not_configured()
        return self._keys.decrypt(*slot, row["master_key_id"], row["nonce"], row["ciphertext"])
