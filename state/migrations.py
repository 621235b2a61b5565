"""Numbered SQL migrations (`state/migrations/NNN_name.sql`), applied once each, in order, as the
owner role (`postgres.owner_dsn`); and the login of the application role the processes use
(`postgres.dsn`, see state/tenancy.py)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlsplit

import asyncpg

from state.tenancy import APP_ROLE

MIGRATIONS_DIR = Path(__file__).with_name("migrations")

# One advisory lock id for every migrator, so two launchers never apply the same file twice.
_LOCK_ID = 0x5717_C4A7


async def apply_migrations(dsn: str) -> list[str]:
    """Apply the pending migrations; returns the names applied."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_ID)
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["name"] for r in await conn.fetch("SELECT name FROM schema_migrations")}
        applied = []
        for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("INSERT INTO schema_migrations (name) VALUES ($1)", path.name)
            applied.append(path.name)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_ID)
        await conn.close()


def dsn_role(dsn: str) -> str:
    """The role a `postgresql://user@host/db` DSN logs in as."""
    user = urlsplit(dsn).username
    if not user:
        raise ValueError(f"a PostgreSQL DSN of Switchyard's names its user: {_redacted(dsn)}")
    return unquote(user)


async def ensure_app_login(owner_dsn: str, app_dsn: str) -> str:
    """Let `app_dsn`'s role log in and act as the application role, as the owner (after the
    migrations, which create the role). Returns what it did, for the operator to read.

    A role that does not exist yet is created with LOGIN and no password: enough where
    PostgreSQL trusts local connections (the local stack, compose/docker-compose.yml). Where it
    asks for a password, create the role yourself first (a password never goes through here,
    where it would reach the server's statement log)."""
    owner, login = dsn_role(owner_dsn), dsn_role(app_dsn)
    if login == owner:
        raise ValueError(f"postgres.dsn and postgres.owner_dsn both log in as {owner!r}: the "
                         f"processes need a role of their own ({APP_ROLE})")
    conn = await asyncpg.connect(owner_dsn)
    try:
        quoted = _quote_ident(login)
        row = await conn.fetchrow(
            "SELECT rolcanlogin, rolsuper OR rolbypassrls AS bypasses,"
            " pg_has_role(oid, $2, 'USAGE') AS member FROM pg_roles WHERE rolname = $1",
            login, APP_ROLE)
        if row is None:
            if urlsplit(app_dsn).password:
                raise ValueError(f"role {login!r} does not exist: create it with its password "
                                 f"yourself (CREATE ROLE {quoted} LOGIN PASSWORD '…'; GRANT "
                                 f"{APP_ROLE} TO {quoted}), then run this again")
            await conn.execute(f"CREATE ROLE {quoted} LOGIN")
            done = f"created role {login} (LOGIN, no password)"
        elif row["bypasses"]:
            raise ValueError(f"role {login!r} is a superuser or has BYPASSRLS: row-level "
                             "security would not apply to it")
        elif not row["rolcanlogin"]:
            await conn.execute(f"ALTER ROLE {quoted} LOGIN")
            done = f"role {login} may now log in"
        else:
            done = f"role {login} logs in"
        if login != APP_ROLE and not (row and row["member"]):
            await conn.execute(f"GRANT {APP_ROLE} TO {quoted}")
            done += f", member of {APP_ROLE}"
        return done
    finally:
        await conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _redacted(dsn: str) -> str:
    parts = urlsplit(dsn)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
