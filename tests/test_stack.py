"""The embedded local stack: up/status/down, idempotence, restart, the CLI, and the migrations."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from pathlib import Path

import pytest

from infra.db import connect, migrate, migrations
from infra.kafka import admin_client
from infra.stack import LocalStack, pid_alive
from schemas.catalog import TopicCatalog


def _topics(stack: LocalStack) -> set[str]:
    return set(admin_client(stack.settings()).list_topics(timeout=10).topics)


def test_stack_up_status_down_restart(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "st")
    try:
        info = stack.up()
        saved = json.loads((tmp_path / "st" / "stack.json").read_text())
        assert saved == info
        assert saved["kafka"]["bootstrap"].startswith("127.0.0.1:")
        assert saved["postgres"]["dsn"].startswith("postgresql://sqis:")
        assert saved["object_store"]["url"] == (tmp_path / "st" / "objects").resolve().as_uri()

        st = stack.status()
        assert st["kafka"]["up"] and st["postgres"]["up"] and st["object_store"]["up"]
        assert "***" in st["postgres"]["dsn"]  # status never shows the password
        assert {name for name, _ in TopicCatalog().all()} <= _topics(stack)

        # idempotent: a second up returns the same running processes
        assert stack.up() == info

        kafka_pid = info["kafka"]["pid"]
        pg_pid = st["postgres"]["pid"]
        with connect(info["postgres"]["dsn"]) as conn:
            conn.execute("INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at,"
                         " image_uri, width, height, model_name, model_version, verdict)"
                         " VALUES (gen_random_uuid(), 'l', 'c', 1, now(), now(), 'u', 1, 1, 'm', '1', 'PASS')")

        stack.down()
        assert not (tmp_path / "st" / "stack.json").exists()
        assert not pid_alive(kafka_pid) and not pid_alive(pg_pid)
        st = stack.status()
        assert not st["kafka"]["up"] and not st["postgres"]["up"]

        # restart: the broker's memory storage lost the topics, up re-creates them; the data stays
        info2 = stack.up()
        # ... on the recorded ports (#8 item 10), so running clients reconnect by themselves
        assert info2["kafka"]["port"] == info["kafka"]["port"]
        assert info2["postgres"]["port"] == info["postgres"]["port"]
        assert info2["postgres"]["dsn"] == info["postgres"]["dsn"]
        assert {name for name, _ in TopicCatalog().all()} <= _topics(stack)
        with connect(info2["postgres"]["dsn"]) as conn:
            assert conn.execute("SELECT count(*) FROM inspections").fetchone() == (1,)
            assert conn.execute("SELECT count(*) FROM schema_migrations").fetchone() == (len(migrations()),)
    finally:
        stack.down(purge=True)
    assert not (tmp_path / "st").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="only meaningful when the tests run as root")
def test_postgres_runs_unprivileged_when_root(local_stack: LocalStack) -> None:
    pg = local_stack.status()["postgres"]
    owner = os.stat(f"/proc/{pg['pid']}").st_uid
    assert owner != 0
    assert pwd.getpwuid(owner).pw_name == pg["user"]
    assert os.stat(pg["datadir"]).st_uid == owner


def test_migrate_is_idempotent(pg_dsn: str) -> None:
    assert migrate(pg_dsn) == []  # the stack already applied everything
    with connect(pg_dsn) as conn:
        rows = conn.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
        cols = {r[0] for r in conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'defects'")}
    assert rows == [(m.version, m.name) for m in migrations()]
    assert {"frame_id", "idx", "class_name", "mask_rle", "mask_area"} <= cols


def test_verdict_is_checked(pg_conn) -> None:  # type: ignore[no-untyped-def]
    import psycopg

    with pytest.raises(psycopg.errors.CheckViolation):
        pg_conn.execute("INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at,"
                        " image_uri, width, height, model_name, model_version, verdict)"
                        " VALUES (gen_random_uuid(), 'l', 'c', 1, now(), now(), 'u', 1, 1, 'm', '1', 'MAYBE')")


def _sqis(*args: str) -> subprocess.CompletedProcess[str]:
    # `python -m sqis` is the console script's target (pyproject: sqis = "sqis.cli:main"), without
    # depending on how the venv's script was generated
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
    return subprocess.run([sys.executable, "-m", "sqis", *args], capture_output=True, text=True, timeout=120, env=env)


def test_cli_up_status_down(tmp_path: Path) -> None:
    sd = str(tmp_path / "cli")
    try:
        r = _sqis("stack", "up", "--state-dir", sd, "--no-postgres")
        assert r.returncode == 0, r.stderr
        assert "127.0.0.1:" in r.stdout
        info = json.loads((tmp_path / "cli" / "stack.json").read_text())
        assert "kafka" in info and "postgres" not in info

        r = _sqis("stack", "status", "--state-dir", sd)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "up" in r.stdout

        r = _sqis("stack", "down", "--state-dir", sd)
        assert r.returncode == 0, r.stderr
        assert not pid_alive(info["kafka"]["pid"])

        r = _sqis("stack", "status", "--state-dir", sd)
        assert r.returncode == 1
    finally:
        LocalStack(sd).down()


def test_cli_help_describes_commands() -> None:
    r = _sqis("stack", "--help")
    assert r.returncode == 0
    for cmd in ("up", "down", "status"):
        assert cmd in r.stdout


@pytest.mark.parametrize("dsn", [
    "postgresql://sqis:s3cr%40t@127.0.0.1:5432/sqis",
    "host=127.0.0.1 port=5432 user=sqis password='s3cr@t' dbname=sqis",
    "postgresql://sqis@127.0.0.1/sqis?password=s3cr%40t",
])
def test_redact_dsn_hides_the_password_in_both_forms(dsn: str) -> None:
    from psycopg.conninfo import conninfo_to_dict

    from infra.settings import redact_dsn

    out = redact_dsn(dsn)
    assert "s3cr" not in out
    assert conninfo_to_dict(out) == conninfo_to_dict(dsn) | {"password": "***"}
    assert "password" not in redact_dsn("host=h dbname=d")  # nothing to hide, nothing added
    assert redact_dsn("not a dsn password=x =") == "***"  # unparseable: nothing shown


@pytest.mark.parametrize("exc_name", ["SinkError", "KafkaException"])
def test_operational_errors_are_one_red_line_exit_1(exc_name: str, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    import sqis.cli
    from infra.kafka import KafkaError, KafkaException
    from sinks.postgres import SinkError

    exc = SinkError("database write failed after 3 attempts: connection refused\n\tIs the server running?") \
        if exc_name == "SinkError" else KafkaException(KafkaError(KafkaError._TRANSPORT, "broker down"))

    def boom(**_kw: object) -> None:
        raise exc

    monkeypatch.setattr(sqis.cli, "app", boom)
    with pytest.raises(SystemExit) as ei:
        sqis.cli.main()
    assert ei.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {exc_name}") and err.count("\n") == 1 and "Traceback" not in err
