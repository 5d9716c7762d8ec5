"""The secure local Kafka (TLS, SASL/SCRAM-SHA-512 users per role, ACLs): the line runs with a principal
per role, and a refused principal ends in one clear line that names it, never in a retry storm."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from infra import kafka
from infra.stack import LocalStack
from schemas.catalog import TopicCatalog
from sinks.postgres import PostgresSink
from sqis.bench.harness import FramePublisher


@pytest.fixture(scope="module")
def secure_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path_factory.mktemp("secure"), topic_prefix=f"s{uuid.uuid4().hex[:6]}.")
    try:
        stack.up(postgres=False, secure=True)
        yield stack
    finally:
        with contextlib.suppress(Exception):
            stack.down(purge=True)


def _settings(stack: LocalStack, role: str, **kw: Any) -> Any:
    kw.setdefault("object_store_url", (stack.state_dir / "objects").as_uri())
    return stack.settings(role=role, kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500, **kw)


def test_the_line_runs_with_one_principal_per_role(secure_stack: LocalStack, pg_dsn: str, pg_conn: Any,
                                                   worker_factory: Any) -> None:
    info = secure_stack.info["kafka"]
    assert info["secure"] and Path(info["ca"]).is_file()
    assert oct(secure_stack.stack_file.stat().st_mode & 0o777) == "0o600"  # it holds the passwords

    pub = FramePublisher(_settings(secure_stack, "producer"), cameras=2, lines=1, size=64, distinct=2)
    refs = pub.prepare(6)
    try:
        pub.publish(refs)
    finally:
        pub.close()
    assert pub.failed == []

    tag = uuid.uuid4().hex[:6]
    w = worker_factory(_settings(secure_stack, "worker"), group_id=f"inference-workers-{tag}", max_batch=4)
    sink = PostgresSink(_settings(secure_stack, "sink"), group_id=f"sink-postgres-{tag}", dsn=pg_dsn,
                        batch_size=3, max_wait_ms=200, startup_wait_s=10)
    try:
        stats = sink.run(max_messages=len(refs), idle_timeout_s=90)
    finally:
        w.stop()
    assert stats.messages == len(refs) and stats.dead_lettered == 0
    ids = [r["frame_id"] for r in refs]
    n = pg_conn.execute("SELECT count(*) FROM inspections WHERE frame_id = ANY(%s::uuid[])", (ids,)).fetchone()[0]
    assert n == len(refs)


def test_a_wrong_password_is_one_line_naming_the_principal(secure_stack: LocalStack,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    s = _settings(secure_stack, "sink", kafka_sasl_password="not-the-password")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(kafka.AccessDenied) as err:
        kafka.wait_for_broker(s, 60)  # would retry with backoff for a minute if it were an outage
    msg = str(err.value)
    assert "User:sink" in msg and "credentials" in msg and "\n" not in msg
    noise = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(noise) <= 2, [r.getMessage() for r in noise]


def test_the_cli_exits_with_one_line_for_a_wrong_password(secure_stack: LocalStack, tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("sqis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
    out = subprocess.run([str(exe), "stack", "env", "--state-dir", str(secure_stack.state_dir), "--role", "sink"],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for line in out.stdout.splitlines():
        k, _, v = line.removeprefix("export ").partition("=")
        env[k] = v.strip("'")
    assert env["SQIS_KAFKA_SASL_USERNAME"] == "sink" and env["SQIS_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    env["SQIS_KAFKA_SASL_PASSWORD"] = "wrong"
    env["SQIS_POSTGRES_DSN"] = "postgresql://nobody@127.0.0.1:1/none"  # never reached: Kafka refuses first
    r = subprocess.run([str(exe), "sink", "postgres", "--state-dir", str(tmp_path), "--topic-prefix",
                        secure_stack.topic_prefix, "--startup-wait-s", "60"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    text = (r.stdout + r.stderr).strip()
    assert "User:sink" in text and "Traceback" not in text, text
    assert len([ln for ln in text.splitlines() if "User:sink" in ln]) == 1, text


@pytest.mark.parametrize(("role", "group", "denied"), [
    ("worker", "inference-workers-x", "topic"),  # a worker may not read inspections
    ("producer", "sink-postgres-x", "group"),  # a producer has no consumer group at all
])
def test_a_missing_acl_stops_the_sink_with_one_line(secure_stack: LocalStack, pg_dsn: str, role: str, group: str,
                                                    denied: str) -> None:
    from infra.consume_loop import LoopError

    sink = PostgresSink(_settings(secure_stack, role), group_id=f"{group}{uuid.uuid4().hex[:4]}", dsn=pg_dsn,
                        startup_wait_s=10)
    with pytest.raises(LoopError) as err:
        sink.run(idle_timeout_s=60)
    msg = str(err.value)
    assert f"User:{role}" in msg and f"access to {denied}" in msg, msg
    if denied == "topic":
        assert TopicCatalog(secure_stack.topic_prefix).inspections in msg


def test_mes_cannot_produce_frames(secure_stack: LocalStack) -> None:
    from infra.kafka_security import denied_message

    s = _settings(secure_stack, "mes")
    p = kafka.producer(s, client_id="mes-probe")
    errs: list[Any] = []
    p.produce(TopicCatalog(s.topic_prefix).frames, b"x", on_delivery=lambda e, _m: errs.append(e))
    p.flush(20)
    assert errs and errs[0] is not None and errs[0].name() == "TOPIC_AUTHORIZATION_FAILED"
    assert "User:mes" in denied_message(s, errs[0], "frames")


def test_a_principal_cannot_read_a_topic_without_acl(secure_stack: LocalStack) -> None:
    cat = TopicCatalog(secure_stack.topic_prefix)
    admin = _settings(secure_stack, "admin")
    p = kafka.producer(admin, client_id="admin-probe")
    p.produce(cat.frames, b"secret frame", key=b"cam")
    assert p.flush(20) == 0

    mes = _settings(secure_stack, "mes")
    visible = set(kafka.admin_client(mes).list_topics(timeout=10).topics)
    assert cat.frames not in visible and cat.part_verdicts in visible  # DESCRIBE only where granted
    c = kafka.consumer(mes, group_id=f"mes-{uuid.uuid4().hex[:6]}", client_id="mes-probe")
    try:
        c.subscribe([cat.frames])
        seen: list[str] = []
        for _ in range(10):
            m = c.poll(1.0)
            if m is None:
                continue
            assert m.error() is not None, "mes read a frame"
            seen.append(m.error().name())
            break
    finally:
        c.close()
    assert seen == ["TOPIC_AUTHORIZATION_FAILED"]


def test_a_producer_without_acl_stops_with_one_line(secure_stack: LocalStack,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from producers.run import run_producer

    caplog.set_level(logging.INFO)
    with pytest.raises(kafka.AccessDenied) as err:
        run_producer(_settings(secure_stack, "mes"), "synthetic", cameras=1, frames=20, size="64x64",
                     install_signal_handlers=False)
    msg = str(err.value)
    assert "User:mes" in msg and TopicCatalog(secure_stack.topic_prefix).frames in msg, msg
    lines = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(lines) <= 1, [r.getMessage() for r in lines]  # never one line per frame


def test_a_worker_without_acl_stops_with_one_line(secure_stack: LocalStack, worker_factory: Any) -> None:
    from inference_workers.worker import WorkerError

    w = worker_factory(_settings(secure_stack, "sink"), group_id=f"sink-iw-{uuid.uuid4().hex[:4]}")
    w.thread.join(60)
    with pytest.raises(WorkerError) as err:
        w.stop()
    msg = str(err.value)
    assert "User:sink" in msg and TopicCatalog(secure_stack.topic_prefix).frames in msg, msg


def test_each_role_gets_only_its_acls() -> None:
    from confluent_kafka.admin import AclOperation, ResourceType

    from infra.kafka_security import role_acls

    cat = TopicCatalog("p.")
    grants: dict[str, set[tuple[str, str]]] = {}
    for b in role_acls("p."):
        if b.restype == ResourceType.TOPIC:
            grants.setdefault(b.principal, set()).add((b.name, b.operation.name))
    writes = {p: {t for t, op in g if op == AclOperation.WRITE.name} for p, g in grants.items()}
    reads = {p: {t for t, op in g if op == AclOperation.READ.name} for p, g in grants.items()}
    assert writes["User:producer"] == {cat.frames} and not reads.get("User:producer")
    assert writes["User:worker"] == {cat.inspections, cat.inspections_shadow, cat.frames_dlq}
    assert reads["User:worker"] == {cat.frames}
    assert not writes.get("User:mes") and cat.frames not in reads["User:mes"]
    assert reads["User:stream"] == {cat.inspections, cat.inspections_shadow}  # the canary and shadow processors
    assert cat.inspections_shadow not in reads["User:mes"]  # a shadow verdict never reaches MES
    assert cat.frames not in reads["User:sink"] and writes["User:sink"] == {cat.frames_dlq}
    assert "User:admin" not in grants  # a super user needs none


def test_a_restart_keeps_the_mode_the_users_and_the_acls(secure_stack: LocalStack) -> None:
    before = secure_stack.info["kafka"]
    secure_stack.down()
    after = secure_stack.up(postgres=False)["kafka"]  # no mode given: the one it had
    assert after["secure"] and after["users"] == before["users"] and after["ca"] == before["ca"]
    cat = TopicCatalog(secure_stack.topic_prefix)
    p = kafka.producer(_settings(secure_stack, "producer"), client_id="after-restart")
    errs: list[Any] = []
    p.produce(cat.frames, b"x", on_delivery=lambda e, _m: errs.append(e))
    p.flush(30)
    assert errs == [None]
    visible = set(kafka.admin_client(_settings(secure_stack, "mes")).list_topics(timeout=10).topics)
    assert cat.frames not in visible


def test_a_worker_with_a_wrong_password_stops_with_one_line(secure_stack: LocalStack, worker_factory: Any,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    from inference_workers.worker import WorkerError

    caplog.set_level(logging.INFO)
    w = worker_factory(_settings(secure_stack, "worker", kafka_sasl_password="bad"),
                       group_id=f"inference-workers-{uuid.uuid4().hex[:4]}")
    w.thread.join(60)
    with pytest.raises(WorkerError) as err:
        w.stop()
    assert "User:worker" in str(err.value) and "credentials" in str(err.value)
    client = [r for r in caplog.records if r.name == "infra.kafka.client"]
    assert len(client) <= 6, [r.getMessage() for r in client]  # librdkafka's lines, de-duplicated: no storm


def test_stream_processor_and_mes_with_their_principals(secure_stack: LocalStack) -> None:
    import time

    from stream_processors.app import ProcessorRunner
    from stream_processors.processors import RatesProcessor
    from tests.stream_fixtures import inspection, produce_inspections, read_topic

    w, us, line = 10, 1_000_000, f"S-{uuid.uuid4().hex[:6]}"
    t0 = (int(time.time()) // w) * w * us - 50 * w * us
    recs = [inspection(line=line, cam="C1", captured_at=t0 + k * w * us // 10, seq=k, fail=k % 3 == 0)
            for k in range(30)]
    produce_inspections(_settings(secure_stack, "worker"), recs)  # the worker principal writes inspections
    runner = ProcessorRunner(_settings(secure_stack, "stream"), RatesProcessor(window_s=w, grace_s=1, idle_close_s=1.0),
                             group_id=f"stream-rates-{uuid.uuid4().hex[:6]}")
    runner.run(max_idle_s=4)
    got = read_topic(_settings(secure_stack, "mes"), "defect_rates", "defect_rate", f"mes-{uuid.uuid4().hex[:6]}",
                     min_count=1, timeout=20)
    assert any(r["line_id"] == line for r in got)
