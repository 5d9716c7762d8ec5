"""PostgreSQL access: connections (psycopg 3) and the schema migrations in infra/migrations.

Migrations are files ``NNN_name.sql`` applied in order, each in its own transaction, recorded in
``schema_migrations``; a session advisory lock serialises concurrent ``migrate`` calls.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any

import psycopg

from infra.errors import InfraError

log = logging.getLogger(__name__)

# Arbitrary constant shared by every process that migrates this schema.
MIGRATION_LOCK_KEY = 0x5A15_0001
_NAME = re.compile(r"^(\d{3,})_[A-Za-z0-9_]+\.sql$")


class MigrationError(InfraError):
    """The database schema cannot be brought to the current version."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def connect(dsn: str, *, autocommit: bool = False, **kwargs: Any) -> psycopg.Connection[Any]:
    """A psycopg 3 connection (tuple rows) with a short connect timeout."""
    kwargs.setdefault("connect_timeout", 10)
    return psycopg.connect(dsn, autocommit=autocommit, **kwargs)


class DatabaseUnavailable(InfraError):
    """PostgreSQL did not answer a start-up check: a wrong address, a server not started, refused credentials."""


def check_database(dsn: str, timeout_s: float = 3.0) -> None:
    """One connection within ``timeout_s``; DatabaseUnavailable (one line, no password) otherwise."""
    from psycopg.conninfo import conninfo_to_dict

    try:
        with connect(dsn, autocommit=True, connect_timeout=max(1, round(timeout_s))):
            return
    except psycopg.Error as exc:
        p = conninfo_to_dict(dsn)
        where = f"{p.get('host', 'localhost')}:{p.get('port', 5432)}/{p.get('dbname', '')}"
        why = " ".join(str(exc).split())[:200]
        raise DatabaseUnavailable(f"PostgreSQL at {where} is unreachable ({why}); check SQIS_POSTGRES_DSN, "
                                  "or `sqis stack status`") from None


def migrations() -> list[Migration]:
    """Every migration file of infra/migrations, ordered by version."""
    out: list[Migration] = []
    for entry in (resources.files("infra") / "migrations").iterdir():
        m = _NAME.match(entry.name)
        if m:
            out.append(Migration(int(m.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    out.sort(key=lambda m: m.version)
    versions = [m.version for m in out]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"duplicate migration versions: {versions}")
    return out


def migrate(dsn: str) -> list[str]:
    """Apply the migrations not applied yet; returns their names. Safe to call concurrently."""
    applied_now: list[str] = []
    with connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
        try:
            conn.execute(
                """CREATE TABLE IF NOT EXISTS schema_migrations (
                       version    integer PRIMARY KEY,
                       name       text NOT NULL,
                       checksum   text NOT NULL,
                       applied_at timestamptz NOT NULL DEFAULT now())"""
            )
            done = {v: c for v, c in conn.execute("SELECT version, checksum FROM schema_migrations")}
            for mig in migrations():
                if mig.version in done:
                    if done[mig.version] != mig.checksum:
                        log.warning("applied migration changed since", extra={"migration": mig.name})
                    continue
                try:
                    with conn.transaction():
                        conn.execute(mig.sql)  # type: ignore[arg-type]  # no params: multi-statement
                        conn.execute(
                            "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                            (mig.version, mig.name, mig.checksum),
                        )
                except psycopg.Error as exc:
                    raise MigrationError(f"migration {mig.name} failed: {exc}") from exc
                log.info("migration applied", extra={"migration": mig.name})
                applied_now.append(mig.name)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
    return applied_now


# ---- schema version checks and writer sessions ------------------------------------------------------


class SchemaBehind(MigrationError):
    """The database is older than this build needs (run `sqis db migrate`)."""


def required_version() -> int:
    """The schema version this build needs: the highest migration it ships."""
    ms = migrations()
    return ms[-1].version if ms else 0


def schema_status(dsn: str) -> tuple[int, list[str]]:
    """(highest applied version, names of shipped migrations not applied yet); 0 for an empty database."""
    with connect(dsn, autocommit=True) as conn:
        exists = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()
        applied: set[int] = set()
        if exists and exists[0]:
            applied = {v for (v,) in conn.execute("SELECT version FROM schema_migrations")}
    pending = [m.name for m in migrations() if m.version not in applied]
    return (max(applied) if applied else 0), pending


def check_schema(dsn: str, *, role: str) -> int:
    """Fail fast at the start of a long-running writer whose database is behind this build."""
    current, pending = schema_status(dsn)
    if pending:
        raise SchemaBehind(
            f"{role}: the database schema is at version {current}, this build needs {required_version()} "
            f"(pending: {', '.join(pending)}); run `sqis db migrate` first")
    return current


def writer_options(statement_timeout_ms: int, lock_timeout_ms: int) -> str:
    """libpq ``options`` for a writer session: no statement or lock wait may hang the process forever."""
    return f"-c statement_timeout={int(statement_timeout_ms)} -c lock_timeout={int(lock_timeout_ms)}"


def connect_writer(dsn: str, *, statement_timeout_ms: int = 30_000, lock_timeout_ms: int = 5_000,
                   **kwargs: Any) -> psycopg.Connection[Any]:
    """A connection for a long-running writer, with ``statement_timeout`` and ``lock_timeout`` set."""
    return connect(dsn, options=writer_options(statement_timeout_ms, lock_timeout_ms), **kwargs)
