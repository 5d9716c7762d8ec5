"""`sqis db migrate` / `sqis db status` on any PostgreSQL given by settings, the schema-version check
of long-running writers, and their statement/lock timeouts, against the session's real PostgreSQL."""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from infra.db import check_schema, connect, connect_writer, migrations, required_version, schema_status
from tests.deploy_helpers import REPO, clean_env, sqis_cmd


@pytest.fixture
def fresh_dsn(local_stack: Any, pg_conn: Any) -> Iterator[str]:
    """A new, empty database on the session's server, owned by the app role, dropped afterwards."""
    from infra.stack import PG_SUPERUSER

    pg = local_stack.info["postgres"]
    name = f"mig_{uuid.uuid4().hex[:8]}"
    user = pg_conn.execute("SELECT current_user").fetchone()[0]
    admin = psycopg.connect(host=pg["socket_dir"], port=pg["port"], user=PG_SUPERUSER, dbname="postgres",
                            autocommit=True, connect_timeout=10)
    admin.execute(f'CREATE DATABASE {name} OWNER "{user}"')
    params = conninfo_to_dict(pg_conn.info.dsn)
    params["password"] = pg_conn.info.password
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


def _sqis(*args: str, dsn: str) -> subprocess.CompletedProcess[str]:
    env = clean_env() | {"SQIS_POSTGRES_DSN": dsn, "SQIS_LOG_FORMAT": "console", "PYTHONPATH": str(REPO)}
    return subprocess.run([*sqis_cmd(), *args], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_db_migrate_cli_on_an_empty_database_then_idempotent(fresh_dsn: str) -> None:
    r = _sqis("db", "status", "--json", dsn=fresh_dsn)
    assert r.returncode == 3, r.stderr  # behind: every migration pending
    assert json.loads(r.stdout)["pending"] == [m.name for m in migrations()]

    r = _sqis("db", "migrate", "--json", dsn=fresh_dsn)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == {"applied": [m.name for m in migrations()], "version": required_version()}
    r = _sqis("db", "migrate", "--json", dsn=fresh_dsn)
    assert r.returncode == 0 and json.loads(r.stdout)["applied"] == []
    r = _sqis("db", "status", dsn=fresh_dsn)
    assert r.returncode == 0 and f"schema version {required_version()}" in r.stdout
    with connect(fresh_dsn) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m.version for m in migrations()]


def test_db_migrate_unreachable_server_is_one_line_exit_1() -> None:
    r = _sqis("db", "migrate", dsn="postgresql://nobody:pw@127.0.0.1:1/none?connect_timeout=2")
    assert r.returncode == 1
    assert r.stderr.startswith("error: ") and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_writer_refuses_to_start_on_a_database_behind_this_build(fresh_dsn: str, settings_factory: Any) -> None:
    from sinks.postgres import PostgresSink, SinkError

    with pytest.raises(Exception, match=r"schema is at version 0.*sqis db migrate"):
        check_schema(fresh_dsn, role="test")
    s = settings_factory()
    sink = PostgresSink(s, group_id=f"g-{uuid.uuid4().hex[:6]}", dsn=fresh_dsn)
    with pytest.raises(SinkError, match="sink postgres: the database schema is at version 0"):
        sink.run(idle_timeout_s=1)
    # one migration applied, the rest pending: still refused, and the pending ones are named
    first = migrations()[0]
    with connect(fresh_dsn) as conn:
        conn.execute("CREATE TABLE schema_migrations (version integer PRIMARY KEY, name text NOT NULL, "
                     "checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())")
        conn.execute(first.sql)  # type: ignore[arg-type]
        conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)", (first.version, first.name, first.checksum))
    current, pending = schema_status(fresh_dsn)
    assert current == first.version and pending == [m.name for m in migrations()[1:]]
    if pending:
        with pytest.raises(SinkError, match=pending[0]):
            PostgresSink(s, group_id="g-x", dsn=fresh_dsn).run(idle_timeout_s=1)


def test_writer_sessions_set_statement_and_lock_timeouts(pg_dsn: str, pg_conn: Any, settings_factory: Any) -> None:
    from sinks.postgres import PostgresSink

    s = settings_factory(pg_statement_timeout_ms=12_000, pg_lock_timeout_ms=300)
    sink = PostgresSink(s, group_id="g-timeouts")
    conn = sink._connection()
    try:
        assert conn.execute("SHOW statement_timeout").fetchone()[0] == "12s"
        assert conn.execute("SHOW lock_timeout").fetchone()[0] == "300ms"
    finally:
        conn.close()
    # the lock timeout really bounds a wait: a writer blocked by a table lock fails fast
    holder = connect(pg_dsn)
    holder.execute("LOCK TABLE inspections IN ACCESS EXCLUSIVE MODE")
    try:
        with connect_writer(pg_dsn, statement_timeout_ms=10_000, lock_timeout_ms=200) as w:
            t0 = time.monotonic()
            with pytest.raises(psycopg.errors.LockNotAvailable):
                w.execute("DELETE FROM inspections WHERE false")
            assert time.monotonic() - t0 < 5
    finally:
        holder.rollback()
        holder.close()


def test_settings_reject_a_negative_timeout() -> None:
    from pydantic import ValidationError

    from infra.settings import Settings

    with pytest.raises(ValidationError):
        Settings(pg_lock_timeout_ms=-1, _env_file=None)  # type: ignore[call-arg]


def test_sizing_measures_records_and_rows(pg_dsn: str) -> None:
    from sqis.bench.sizing import measure

    small = measure(2, 10, 160, 160, dsn=pg_dsn, samples=3)
    big = measure(2, 10, 640, 512, samples=3)
    assert 1_000 < small.jpeg_bytes < big.jpeg_bytes
    assert 100 < small.frame_ref_bytes < 1_000 and 100 < small.inspection_bytes < 2_000
    assert small.pg_bytes_per_row is not None and small.pg_bytes_per_row > small.inspection_bytes
    assert small.frames_per_day == 2 * 10 * 86_400
    assert small.postgres_gb_per_day == pytest.approx(small.frames_per_day * small.pg_bytes_per_row / 1e9)
    assert big.pg_bytes_per_row is None and big.postgres_gb_per_day is None


def test_sizing_cli_rejects_a_bad_size() -> None:
    r = _sqis("metrics", "sizing", "--size", "big", dsn="postgresql://x@127.0.0.1:1/none")
    assert r.returncode == 2 and "--size" in r.stderr and "Traceback" not in r.stderr
