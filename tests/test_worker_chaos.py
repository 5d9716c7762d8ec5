"""Worker chaos (#8 fault-injection suite): SQIS_CHAOS_FRAMES frames (default 5,000) through a group of
`sqis worker` processes while, every few seconds, a random worker is SIGKILLed and a new one started.
At the end PostgreSQL holds exactly one row per frame_id, none missing; redeliveries (inspections
published more than once) are counted and reported. Marked chaos and slow: about 2 minutes on 2 cores.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.db import connect
from sqis.bench.harness import FramePublisher, TopicCollector, WorkerPool
from tests.test_e2e import SinkThread

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

FRAMES = int(os.environ.get("SQIS_CHAOS_FRAMES", "5000"))
KILL_EVERY_S = 4.0


def _rows(dsn: str, ids: list[str]) -> int:
    with connect(dsn) as conn:
        return int(conn.execute("SELECT count(*) FROM inspections WHERE frame_id = ANY(%s::uuid[])",
                                (ids,)).fetchone()[0])


def test_random_worker_sigkills_lose_and_double_nothing(settings_factory: Any, pg_dsn: str, onnx_model_path: Path,
                                                        tmp_path: Path, record_property: Any) -> None:
    s = settings_factory()
    pub = FramePublisher(s, cameras=6, lines=2, size=96)
    refs = pub.prepare(FRAMES)
    ids = sorted(r["frame_id"] for r in refs)
    insp = TopicCollector(s, "inspections")
    sink = SinkThread(s, f"sink-{s.topic_prefix}")
    pool = WorkerPool(s, str(onnx_model_path), 2, tmp_path / "logs", max_batch=16, max_wait_ms=20, fetch_threads=1)
    rng = random.Random(8)
    kills = 0
    stop = threading.Event()
    try:
        pool.wait_ready(timeout=120, settle_s=1)
        feeder = threading.Thread(target=pub.publish, args=(refs,), kwargs={"rate_fps": FRAMES / 40, "stop": stop},
                                  daemon=True)
        feeder.start()
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if insp.wait_frames(set(ids), KILL_EVERY_S):
                break
            live = [i for i, p in enumerate(pool.procs) if p.poll() is None]
            if feeder.is_alive() and len(live) >= 2:
                pool.kill(rng.choice(live), signal.SIGKILL)
                kills += 1
            if len([p for p in pool.procs if p.poll() is None]) < 2:
                pool.start_one()
        feeder.join(30)
        assert not pub.failed, pub.failed[:3]
        assert insp.wait_frames(set(ids), 60), "some frames were never inspected"
        deadline = time.monotonic() + 60
        while _rows(pg_dsn, ids) < FRAMES and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _rows(pg_dsn, ids) == FRAMES  # one row per frame_id (the primary key forbids more), none missing
        counts = Counter(r["frame_id"] for r in insp.snapshot())
        redelivered = sum(c - 1 for c in counts.values())
        record_property("kills", kills)
        record_property("redelivered_inspections", redelivered)
        print(f"chaos: {FRAMES} frames, {kills} SIGKILLs, {redelivered} inspections published more than once")
        assert kills >= 3 and set(counts) == set(ids)
    finally:
        stop.set()
        pool.stop()
        sink.stop()
        insp.close()
