"""Durability across a broker crash (#17): the broker is SIGKILLed mid-run (nothing flushed, no
controlled shutdown) and started again on the same ports with its data. The producer, two worker
processes, the PostgreSQL sink and a stream processor all run through it and resume by themselves;
afterwards every frame the producer captured is on `frames`, has exactly one inspection on
`inspections` read with read_committed, exactly one row in PostgreSQL, and `sqis reconcile` (its
``find_gaps``) finds nothing missing. Bounded: ~60 s."""

from __future__ import annotations

import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.db import connect
from infra.objectstore import open_store
from producers import run_producer
from sinks.reconcile import find_gaps
from sqis.bench.harness import TopicCollector, WorkerPool
from stream_processors.app import ProcessorRunner
from stream_processors.processors import RatesProcessor
from tests.test_e2e import SinkThread
from tests.test_sink_faults import _wait

pytestmark = pytest.mark.chaos


def _rows(dsn: str, ids: list[str]) -> Counter[str]:
    with connect(dsn) as conn:
        return Counter(r[0] for r in conn.execute(
            "SELECT frame_id::text FROM inspections WHERE frame_id = ANY(%s::uuid[])", (ids,)).fetchall())


def test_everything_resumes_after_a_broker_crash_nothing_lost_nothing_doubled(
        private_kafka: Any, pg_dsn: str, onnx_model_path: Path, tmp_path: Path) -> None:
    s = private_kafka.settings(postgres_dsn=pg_dsn, object_store_url=(tmp_path / "objects").as_uri(),
                               kafka_session_timeout_ms=6000, kafka_heartbeat_interval_ms=1000,
                               log_format="console", state_dir=tmp_path / "state")
    started_us = int(time.time() * 1e6)
    frames = TopicCollector(s, "frames")
    insp = TopicCollector(s, "inspections")
    pool = WorkerPool(s, str(onnx_model_path), 2, tmp_path / "logs", max_batch=8, max_wait_ms=20, fetch_threads=1)
    sink = SinkThread(s, "sink-postgres")
    stop_stream = threading.Event()
    rates = ProcessorRunner(s, RatesProcessor(), stop_event=stop_stream)
    stream_errors: list[BaseException] = []

    def run_rates() -> None:
        try:
            rates.run()
        except BaseException as exc:  # a processor that gave up would show here
            stream_errors.append(exc)

    stream_t = threading.Thread(target=run_rates, daemon=True, name="rates")
    stop_prod = threading.Event()
    out: dict[str, Any] = {}
    prod = threading.Thread(target=lambda: out.setdefault("stats", run_producer(
        s, "synthetic", cameras=2, fps=10, frames=0, seed=3, stop_event=stop_prod, drain_timeout_s=60,
        install_signal_handlers=False)), daemon=True, name="producer")
    try:
        pool.wait_ready(timeout=120, settle_s=1)
        stream_t.start()
        prod.start()
        assert insp.wait_for(lambda recs: len(recs) >= 20, 60), "the line did not start"
        private_kafka.kill()  # SIGKILL: a crash, not a shutdown
        time.sleep(4)
        private_kafka.start()  # same ports, same data
        time.sleep(8)  # the line runs on after the crash
        stop_prod.set()
        prod.join(90)
        assert not prod.is_alive(), "the producer did not drain after the crash"
        stats = out["stats"]
        assert stats.spool_pending == 0, stats.snapshot()

        assert frames.wait_for(lambda recs: len({r["frame_id"] for r in recs}) >= stats.captured, 60)
        ids = sorted({r["frame_id"] for r in frames.snapshot()})
        assert len(ids) == stats.captured, (len(ids), stats.snapshot())
        assert insp.wait_frames(set(ids), 120), "frames captured around the crash were never inspected"
        assert _wait(lambda: sum(_rows(pg_dsn, ids).values()) >= len(ids), 60)
        time.sleep(2)  # a late duplicate would show now
        per_frame = Counter(r["frame_id"] for r in insp.snapshot())
        doubled = {f: n for f, n in per_frame.items() if n > 1}
        assert not doubled, f"{len(doubled)} frames inspected more than once (read_committed)"
        assert set(per_frame) == set(ids)
        rows = _rows(pg_dsn, ids)
        assert set(rows) == set(ids) and max(rows.values()) == 1
        report = find_gaps(s, open_store(s), since_us=started_us, grace_s=0)
        assert report.checked >= len(ids) and report.clean, (len(report.missing), report.orphans[:3])
        assert all(pool.procs[i].poll() is None for i in range(len(pool.procs))), "a worker exited"
        assert stream_t.is_alive() and not stream_errors, stream_errors
        assert rates.loop.stats.consumed >= len(ids)  # the processor read every inspection
    finally:
        stop_prod.set()
        prod.join(30)
        stop_stream.set()
        stream_t.join(30)
        pool.stop()
        sink.stop()
        frames.close()
        insp.close()
