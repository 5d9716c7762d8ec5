"""Fault injection on the PostgreSQL sink against the real stack (#8): PostgreSQL stopped mid-run, the sink
SIGKILLed mid-transaction, two sinks rebalancing, rows the database refuses, an unreachable database or
broker at start, and the MES duplicate contract. Each test is bounded in time.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra.db import connect
from sinks.postgres import PostgresSink, SinkError, winner_key
from tests.test_sink_postgres import inspection, produce

pytestmark = pytest.mark.chaos

ROOT = Path(__file__).resolve().parents[1]


def _count(dsn: str, ids: list[str], table: str = "inspections") -> int:
    try:
        with connect(dsn, autocommit=True, connect_timeout=2) as c:
            return int(c.execute(f"SELECT count(*) FROM {table} WHERE frame_id = ANY(%s::uuid[])", (ids,)).fetchone()[0])
    except Exception:
        return -1  # database down


def _wait(cond: Any, timeout: float, every: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(every)
    return bool(cond())


def _start(sink: PostgresSink) -> threading.Thread:
    t = threading.Thread(target=sink.run, name="sink-under-test", daemon=True)
    t.start()
    return t


def test_sink_pauses_while_postgres_is_stopped_and_loses_nothing(settings_factory: Any, local_stack: Any,
                                                                 unique_id: str) -> None:
    """PostgreSQL stopped for 20 s mid-run: the sink pauses (no exit, no busy loop), resumes by itself,
    every row is written once and the defects are not doubled."""
    s = settings_factory()
    dsn = s.dsn()
    first = [inspection(i, n_defects=1) for i in range(60)]
    second = [inspection(100 + i, n_defects=2) for i in range(60)]
    ids = [r["frame_id"] for r in first + second]
    produce(s, first)
    sink = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=10, max_wait_ms=100, max_backoff_s=2.0)
    t = _start(sink)
    try:
        assert _wait(lambda: _count(dsn, ids) == 60, 60)
        local_stack._postgres_down(local_stack.info["postgres"])
        try:
            produce(s, second)  # arrives while the database is down
            assert _wait(lambda: sink.stats.outages >= 1, 30), sink.stats
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(10)
            cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            assert t.is_alive(), "the sink exited during the outage"
            assert cpu < 0.3, f"paused sink used {cpu:.0%} of a core (busy loop?)"
            time.sleep(8)  # ~20 s down in all
        finally:
            local_stack.up(kafka=False, postgres=True)  # same port: the sink reconnects by itself
        assert _wait(lambda: _count(dsn, ids) == 120, 90), (_count(dsn, ids), sink.stats)
    finally:
        sink.stop()
        t.join(30)
    assert not t.is_alive()
    assert _count(dsn, ids, "defects") == 60 * 1 + 60 * 2
    assert sink.stats.outages >= 1 and sink.stats.paused_s > 5


def test_sink_sigkilled_mid_transaction_restarts_without_loss_or_doubles(settings_factory: Any,
                                                                        unique_id: str) -> None:
    s = settings_factory()
    dsn = s.dsn()
    recs = [inspection(i, n_defects=i % 3) for i in range(400)]
    ids = [r["frame_id"] for r in recs]
    producer_thread = threading.Thread(target=lambda: [produce(s, recs[i:i + 50]) for i in range(0, 400, 50)])
    producer_thread.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {
        "PYTHONPATH": str(ROOT), "SQIS_KAFKA_SESSION_TIMEOUT_MS": "2000", "SQIS_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
        "SQIS_LOCAL": "1"}  # --state-dir names the session's stack
    cmd = [sys.executable, "-m", "sqis", "sink", "postgres", "--state-dir", str(s.state_dir),
           "--topic-prefix", s.topic_prefix, "--group", f"g-{unique_id}", "--batch-size", "7", "--max-wait-ms", "20"]
    kills = 0
    try:
        for _ in range(3):
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            before = max(0, _count(dsn, ids))
            _wait(lambda b=before: _count(dsn, ids) > b + 20 or _count(dsn, ids) == 400, 60, every=0.05)
            proc.send_signal(signal.SIGKILL)  # mid-batch: small batches, rows arriving continuously
            proc.wait(10)
            kills += 1
        producer_thread.join(60)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
        try:
            assert _wait(lambda: _count(dsn, ids) == 400, 90), _count(dsn, ids)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
    finally:
        producer_thread.join(60)
    assert kills == 3
    assert _count(dsn, ids, "defects") == sum(i % 3 for i in range(400))


def test_two_sinks_rebalancing_keep_every_row_once(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory(partitions={"inspections": 6})
    dsn = s.dsn()
    recs = [inspection(i, n_defects=1) for i in range(600)]
    ids = [r["frame_id"] for r in recs]
    from infra.kafka import producer as make_producer
    from schemas.catalog import TopicCatalog
    from schemas.serde import serialize

    p = make_producer(s, client_id="test")
    topic = TopicCatalog(s.topic_prefix).inspections

    def feed(part: list[dict[str, Any]]) -> None:
        for i, rec in enumerate(part):
            value, headers = serialize("inspection", rec)
            p.produce(topic, value=value, key=rec["frame_id"].encode(), headers=headers, partition=i % 6)
        assert p.flush(30) == 0

    a = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=20, max_wait_ms=50, client_id="sink-a")
    b = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=20, max_wait_ms=50, client_id="sink-b")
    ta = _start(a)
    try:
        feed(recs[:200])
        assert _wait(lambda: _count(dsn, ids) >= 100, 60)
        tb = _start(b)  # joins: partitions move from a to b
        assert _wait(lambda: len(b.assigned) > 0 and len(a.assigned) + len(b.assigned) == 6, 60), (a.assigned, b.assigned)
        feed(recs[200:400])
        assert _wait(lambda: b.stats.messages > 0, 60), "the second sink never consumed"
        a.stop()  # leaves: everything goes to b
        ta.join(30)
        feed(recs[400:])
        assert _wait(lambda: _count(dsn, ids) == 600, 90), _count(dsn, ids)
    finally:
        a.stop()
        b.stop()
        ta.join(30)
        if "tb" in locals():
            tb.join(30)
    assert _count(dsn, ids, "defects") == 600
    assert a.stats.messages + b.stats.messages >= 600


def test_rows_the_database_refuses_are_dead_lettered_and_the_rest_written(settings_factory: Any,
                                                                          unique_id: str) -> None:
    from inference_workers.dlq import read_dead_letters

    s = settings_factory()
    dsn = s.dsn()
    recs = [inspection(i) for i in range(6)]
    recs[2]["line_id"] = "line\x00nul"  # PostgreSQL text cannot hold NUL: a DataError for this row only
    produce(s, recs)
    sink = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=6, max_wait_ms=100)
    sink.run(max_messages=6)
    good = [r["frame_id"] for i, r in enumerate(recs) if i != 2]
    assert _count(dsn, good) == 5 and _count(dsn, [recs[2]["frame_id"]]) == 0
    assert sink.stats.dead_lettered == 1 and sink.stats.outages == 0
    dl = list(read_dead_letters(s, idle_s=2))
    assert len(dl) == 1 and dl[0]["frame_id"] == recs[2]["frame_id"]


def test_unreachable_database_at_start_is_one_clear_error(settings_factory: Any, unique_id: str) -> None:
    s = settings_factory()
    from infra.stack import free_port

    bad = f"postgresql://sqis:x@127.0.0.1:{free_port()}/sqis"
    sink = PostgresSink(s, group_id=f"g-{unique_id}", dsn=bad, startup_wait_s=2)
    t0 = time.monotonic()
    with pytest.raises(SinkError, match="PostgreSQL is unreachable"):
        sink.run(max_messages=1)
    assert time.monotonic() - t0 < 15


def test_cli_with_unreachable_broker_says_so_once_and_exits_1(tmp_path: Path) -> None:
    from infra.stack import free_port

    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {"PYTHONPATH": str(ROOT)}
    for argv in (["dlq", "show"], ["sink", "postgres", "--startup-wait-s", "3"]):
        r = subprocess.run([sys.executable, "-m", "sqis", *argv, "--bootstrap", f"127.0.0.1:{free_port()}",
                            "--state-dir", str(tmp_path)],
                           env=env | {"SQIS_POSTGRES_DSN": "postgresql://x:y@127.0.0.1:1/z"},
                           capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert r.returncode == 1, (argv, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines[-1].startswith("error: ") and "unreachable" in lines[-1], r.stderr
        assert len(lines) <= 3, r.stderr  # one warning at most before the error, no client noise
        assert "rdkafka" not in r.stderr


def test_mes_duplicate_contract_database_agrees_with_the_topic_rule(settings_factory: Any,
                                                                    unique_id: str) -> None:
    """Two inspections of one frame (redelivery after a hot swap): whatever order they arrive in,
    PostgreSQL keeps the one a topic consumer keeps with winner_key(), ties included."""
    s = settings_factory()
    dsn = s.dsn()
    t = 2_000_000_000_000_000
    cases = [
        (dict(inspected_at=t, worker_id="w-a", model_version="3"), dict(inspected_at=t + 1, worker_id="w-a", model_version="2")),
        (dict(inspected_at=t, worker_id="w-b", model_version="3"), dict(inspected_at=t, worker_id="w-a", model_version="4")),
        (dict(inspected_at=t, worker_id="w-a", model_version="10"), dict(inspected_at=t, worker_id="w-a", model_version="9")),
    ]
    expected: dict[str, str] = {}
    batches: list[list[dict[str, Any]]] = [[], []]
    for x, y in cases:
        for order in ((x, y), (y, x)):
            fid = str(uuid.uuid4())
            recs = []
            for n, fields in enumerate(order):
                r = inspection(n, frame_id=fid, inspected_at=fields["inspected_at"])
                r.update(worker_id=fields["worker_id"], model_version=fields["model_version"])
                recs.append(r)
            expected[fid] = max(recs, key=winner_key)["model_version"]
            batches[0].append(recs[0])
            batches[1].append(recs[1])
    produce(s, batches[0])
    PostgresSink(s, group_id=f"g-{unique_id}", batch_size=100, max_wait_ms=100).run(max_messages=len(batches[0]))
    produce(s, batches[1])
    PostgresSink(s, group_id=f"g-{unique_id}", batch_size=100, max_wait_ms=100).run(max_messages=len(batches[1]))
    # and inside one batch (a fresh group re-reads both copies at once)
    PostgresSink(s, group_id=f"g2-{unique_id}", batch_size=100, max_wait_ms=100).run(max_messages=2 * len(expected))
    with connect(dsn, autocommit=True) as c:
        got = dict(c.execute("SELECT frame_id::text, model_version FROM inspections WHERE frame_id = ANY(%s::uuid[])",
                             (list(expected),)).fetchall())
    assert got == expected


def test_lost_partitions_are_written_not_committed(settings_factory: Any, unique_id: str) -> None:
    """on_lost (the group moved on without us): the gathered rows are still written (idempotent), their
    offsets are dropped (not ours to commit), and the sink keeps running."""
    from infra.kafka import TopicPartition

    s = settings_factory()
    dsn = s.dsn()
    recs = [inspection(i) for i in range(4)]
    ids = [r["frame_id"] for r in recs]
    produce(s, recs)
    sink = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=1000, max_wait_ms=600_000)
    t = _start(sink)
    try:
        assert _wait(lambda: len(sink.loop._gathered) == 4, 60)
        m = sink.loop._gathered[0]
        part = (m.topic(), m.partition())
        # what librdkafka calls when the session timed out (here while the sink idles in poll())
        sink.loop._on_lost(sink.loop.consumer, [TopicPartition(part[0], part[1])])
        assert _count(dsn, ids) == 4
        assert part not in sink.loop._consumed and part not in sink.assigned
        assert t.is_alive()
    finally:
        sink.stop()
        t.join(30)
    assert not t.is_alive()
    assert sink.stats.commits == 0  # nothing of the lost partition was committed, even at close


def test_slow_database_keeps_sink_memory_bounded_while_lag_grows_and_drains(settings_factory: Any,
                                                                            unique_id: str) -> None:
    """The inspections table is locked (a slow database) while 20,000 inspections arrive: the sink
    process's RSS stays bounded (batch + a 16 MiB prefetch), then the lag drains, each row once."""
    import psutil

    from tests.test_sink_postgres import inspection as make

    s = settings_factory()
    dsn = s.dsn()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")} | {
        "PYTHONPATH": str(ROOT), "SQIS_KAFKA_SESSION_TIMEOUT_MS": "6000", "SQIS_LOG_LEVEL": "WARNING",
        "SQIS_LOCAL": "1"}  # --state-dir names the session's stack
    cmd = [sys.executable, "-m", "sqis", "sink", "postgres", "--state-dir", str(s.state_dir),
           "--topic-prefix", s.topic_prefix, "--group", f"g-{unique_id}", "--batch-size", "500"]
    recs = [make(i, n_defects=2) for i in range(20_000)]
    ids = [r["frame_id"] for r in recs]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    lock = connect(dsn)
    try:
        produce(s, recs[:500])
        assert _wait(lambda: _count(dsn, ids) == 500, 60)
        ps = psutil.Process(proc.pid)
        base = ps.memory_info().rss
        lock.execute("LOCK TABLE inspections IN ACCESS EXCLUSIVE MODE")  # held until commit
        peak = base
        for i in range(500, 20_000, 2500):
            produce(s, recs[i:i + 2500])
            peak = max(peak, ps.memory_info().rss)
        for _ in range(20):
            time.sleep(0.25)
            peak = max(peak, ps.memory_info().rss)
        lock.commit()  # the database is fast again: the lag drains
        assert _wait(lambda: _count(dsn, ids) == 20_000, 120), _count(dsn, ids)
        grew_mb = (peak - base) / 2**20
        print(f"slow sink: RSS {base / 2**20:.0f} MiB -> peak {peak / 2**20:.0f} MiB while 19,500 rows waited")
        assert grew_mb < 120, f"sink RSS grew by {grew_mb:.0f} MiB"
    finally:
        lock.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    assert _count(dsn, ids, "defects") == 40_000


def _set_dlq_max_bytes(s: Any, topic: str, value: int) -> None:
    """Change the DLQ topic's max.message.bytes on the broker (incremental, nothing else touched)."""
    from confluent_kafka.admin import AlterConfigOpType, ConfigEntry, ConfigResource

    from infra.kafka import admin_client

    res = ConfigResource(ConfigResource.Type.TOPIC, topic, incremental_configs=[
        ConfigEntry("max.message.bytes", str(value), incremental_operation=AlterConfigOpType.SET)])
    admin = admin_client(s)  # kept alive until the futures are done
    for fut in admin.incremental_alter_configs([res]).values():
        fut.result(30)


def test_dlq_delivery_failure_commits_nothing_and_recovers_by_itself(
        settings_factory: Any, unique_id: str, caplog: pytest.LogCaptureFixture) -> None:
    """The broker refuses the sink's dead letter for real (the DLQ topic's max.message.bytes lowered
    below its size: MSG_SIZE_TOO_LARGE): the refused row's offset is not committed, the sink says so in
    one warning line, pauses with backoff (no busy loop, no exit, no traceback) and, once the topic takes
    dead letters again, dead-letters the row and commits by itself."""
    import logging

    from confluent_kafka import Consumer

    from inference_workers.dlq import read_dead_letters
    from infra.kafka import TopicPartition
    from schemas.catalog import TopicCatalog

    s = settings_factory()
    cat = TopicCatalog(s.topic_prefix)
    _set_dlq_max_bytes(s, cat.frames_dlq, 64)  # smaller than any record batch
    dsn = s.dsn()
    recs = [inspection(i) for i in range(6)]
    recs[2]["line_id"] = "line\x00nul"  # PostgreSQL refuses this row: it must be dead-lettered
    produce(s, recs)
    good = [r["frame_id"] for i, r in enumerate(recs) if i != 2]
    group = f"g-{unique_id}"

    def committed() -> int:
        c = Consumer({"bootstrap.servers": s.bootstrap(), "group.id": group, "log_level": 0})
        try:
            return int(c.committed([TopicPartition(cat.inspections, 0)], timeout=10)[0].offset)
        finally:
            c.close()

    sink = PostgresSink(s, group_id=group, batch_size=6, max_wait_ms=100, max_backoff_s=2.0)
    with caplog.at_level(logging.DEBUG, logger="infra.consume_loop"), \
            caplog.at_level(logging.DEBUG, logger="sinks.postgres"):
        t = _start(sink)
        try:
            assert _wait(lambda: sink.stats.outages >= 1, 30), sink.stats
            cpu0, wall0 = time.process_time(), time.monotonic()
            time.sleep(3)  # several retries, each refused again
            cpu = (time.process_time() - cpu0) / (time.monotonic() - wall0)
            assert t.is_alive(), "the sink exited on a DLQ delivery failure"
            assert cpu < 0.3, f"paused sink used {cpu:.0%} of a core (busy loop?)"
            assert committed() < 3, "the refused row's offset was committed: the row is lost"
            st = sink.stats
            assert st.commits == 0 and st.dead_lettered == 0 and st.outages == 1 and st.delivery_failures >= 2, st
            assert _count(dsn, good) == 5  # rewritten idempotently on each retry, never doubled

            limit = dict(cat.all())[cat.frames_dlq].max_message_bytes
            _set_dlq_max_bytes(s, cat.frames_dlq, limit)  # the broker takes dead letters again
            assert _wait(lambda: sink.stats.commits >= 1, 30), (sink.stats, sink.loop.paused)
            assert _wait(lambda: committed() == 6, 10)
        finally:
            sink.stop()
            t.join(30)
    assert not t.is_alive()
    dl = list(read_dead_letters(s, idle_s=2))
    assert recs[2]["frame_id"] in {d["frame_id"] for d in dl}
    assert _count(dsn, good) == 5 and _count(dsn, [recs[2]["frame_id"]]) == 0
    assert sink.stats.outages == 1 and sink.stats.dead_lettered == 1
    ours = [r for r in caplog.records if r.name in ("sinks.postgres", "infra.consume_loop")]
    paused = [r for r in ours if r.levelno >= logging.WARNING and "paused:" in r.getMessage()]
    assert len(paused) == 1, [r.getMessage() for r in paused]
    msg = paused[0].getMessage()
    assert msg.startswith("sink postgres paused")
    assert cat.frames_dlq in msg and "MSG_SIZE_TOO_LARGE" in msg and "\n" not in msg
    assert isinstance(getattr(paused[0], "rewound", None), dict)  # structured: which offsets it rewound to
    assert [r.getMessage() for r in ours if "resumed after" in r.getMessage()] != []
    assert not [r for r in ours if r.levelno >= logging.ERROR or r.exc_info]
