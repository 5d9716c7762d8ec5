"""Broker restart mid-run (#8 items 10, 12): `stack down` + `stack up` on the same state directory keeps the
broker's port, the producer spools through the outage (its stack file briefly absent) and replays, the
sink reconnects by itself, and every frame captured after the restart reaches the frames topic.
A private Apache Kafka (a LocalStack of its own) is used so the session broker is not touched. Bounded: ~40 s."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from infra.stack import LocalStack
from producers import run_producer
from sinks.postgres import PostgresSink
from tests.test_producers_kafka import _consume
from tests.test_sink_faults import _count, _wait
from tests.test_sink_postgres import inspection, produce

pytestmark = pytest.mark.chaos


def test_clients_ride_out_a_broker_restart(tmp_path: Path, pg_dsn: str) -> None:
    prefix = f"r{uuid.uuid4().hex[:6]}."
    stack = LocalStack(tmp_path / "st", topic_prefix=prefix)
    stack.up(postgres=False)
    port = stack.info["kafka"]["port"]
    # no explicit bootstrap: the clients follow .sqis/stack.json, which `down` removes for a while
    s = stack.settings(postgres_dsn=pg_dsn, object_store_url=(tmp_path / "objects").as_uri(),
                       kafka_session_timeout_ms=2000, kafka_heartbeat_interval_ms=500)
    s = s.model_copy(update={"kafka_bootstrap": None})
    stop = threading.Event()
    out: dict[str, Any] = {}
    prod = threading.Thread(target=lambda: out.setdefault("stats", run_producer(
        s, "synthetic", cameras=1, fps=10, frames=0, seed=5, stop_event=stop, drain_timeout_s=30,
        install_signal_handlers=False)), daemon=True)
    sink = PostgresSink(s, group_id=f"g-{prefix}", batch_size=5, max_wait_ms=100, max_backoff_s=2.0)
    sink_t = threading.Thread(target=sink.run, daemon=True)
    try:
        prod.start()
        sink_t.start()
        time.sleep(3)
        # the restart is ridden out by a member of the group: under load the sink's first join can
        # still be under way after 3 s (the fresh broker loading its offsets topic)
        assert _wait(lambda: bool(sink.assigned), 30), ("the sink never joined before the restart", sink.stats)
        stack.down()
        time.sleep(6)  # the broker is gone (and stack.json with it)
        restarted_at_us = int(time.time() * 1e6)
        info = stack.up(postgres=False)
        assert info["kafka"]["port"] == port  # same port: nobody needs a new address
        time.sleep(6)
        stop.set()
        prod.join(60)
        assert not prod.is_alive()
        stats = out["stats"]
        assert stats.spool_pending == 0 and stats.spooled > 0 and stats.replayed > 0, stats.snapshot()
        recs = [r for _, r in _consume(s.model_copy(update={"kafka_bootstrap": info["kafka"]["bootstrap"]}),
                                       stats.captured, timeout=15)]
        after = [r for r in recs if r["captured_at"] >= restarted_at_us]
        assert after, "no frame captured after the restart reached the topic"
        seqs = sorted(r["seq"] for r in recs)
        assert seqs == sorted(set(seqs))  # no duplicates
        assert max(seqs) == stats.captured - 1  # the last frames captured made it

        recs2 = [inspection(i) for i in range(10)]
        produce(s.model_copy(update={"kafka_bootstrap": info["kafka"]["bootstrap"]}), recs2)
        ids = [r["frame_id"] for r in recs2]
        assert _wait(lambda: _count(pg_dsn, ids) == 10, 60), (sink.stats, sink_t.is_alive(), sink.assigned,
                                                              sink.loop.recreated)
    finally:
        stop.set()
        sink.stop()
        sink_t.join(30)
        stack.down(purge=True)
