"""End to end: `sqis produce` (4 synthetic cameras, 2 lines) -> 3 `sqis worker` processes -> PostgreSQL.

Exactly one row per frame, none missing, each with model version and timings; also when one
worker is SIGKILLed in the middle of the run (its partitions move to the survivors, which redo
the uncommitted frames; the sink's upsert on frame_id absorbs the duplicates).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from infra.db import connect
from sqis.bench.harness import TopicCollector, WorkerPool, settings_env
from tests.model_fixtures import model_identity

FRAMES_PER_CAMERA = 250
CAMERAS = 4
TOTAL = FRAMES_PER_CAMERA * CAMERAS

pytestmark = pytest.mark.slow


def _produce(s: Any, fps: float) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sqis", "produce", "--source", "synthetic", "--cameras", str(CAMERAS),
           "--lines", "2", "--frames", str(FRAMES_PER_CAMERA), "--fps", str(fps), "--size", "128x128",
           "--seed", "7"]
    return subprocess.Popen(cmd, env=os.environ | settings_env(s), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)


class SinkThread:
    def __init__(self, s: Any, group: str) -> None:
        from sinks.postgres import PostgresSink

        self.sink = PostgresSink(s, group_id=group, max_wait_ms=200)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="pg-sink")
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sink.run()
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self.sink.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()
        if self.error is not None:
            raise self.error


def _rows(dsn: str, ids: list[str]) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn:
        return conn.execute(
            "SELECT frame_id::text, model_name, model_version, timings, total_ms, worker_id, batch_size, verdict, "
            "camera_id, line_id FROM inspections WHERE frame_id = ANY(%s::uuid[])", (ids,)).fetchall()


def _wait_rows(dsn: str, ids: list[str], timeout: float) -> int:
    deadline = time.monotonic() + timeout
    n = 0
    while time.monotonic() < deadline:
        with connect(dsn) as conn:
            n = conn.execute("SELECT count(*) FROM inspections WHERE frame_id = ANY(%s::uuid[])", (ids,)).fetchone()[0]
        if n >= len(ids):
            break
        time.sleep(0.5)
    return int(n)


def _run(settings_factory: Any, pg_dsn: str, onnx_model_path: Path, tmp_path: Path, *, crash: bool) -> dict[str, Any]:
    s = settings_factory()  # catalog partition counts (frames: 12)
    frames = TopicCollector(s, "frames")
    insp = TopicCollector(s, "inspections")
    sink = SinkThread(s, f"sink-{s.topic_prefix}")
    pool = WorkerPool(s, str(onnx_model_path), 3, tmp_path / "logs", max_batch=8, max_wait_ms=30, fetch_threads=2)
    producer: subprocess.Popen[bytes] | None = None
    victim: int | None = None
    try:
        pool.wait_ready(timeout=120, settle_s=2)
        producer = _produce(s, fps=25 if crash else 0)  # crash run: ~100 frames/s for ~10 s
        if crash:
            # kill, mid-run, the busiest worker once it has inspected some frames
            assert insp.wait_for(lambda recs: max(Counter(r["worker_id"] for r in recs).values(), default=0) >= 40, 120)
            busiest = Counter(r["worker_id"] for r in insp.snapshot()).most_common(1)[0][0]
            victim = pool.ids.index(busiest)
            pool.kill(victim, signal.SIGKILL)
        assert producer.wait(timeout=300) == 0, producer.stderr.read().decode() if producer.stderr else ""
        assert frames.wait_for(lambda r: len(r) >= TOTAL, 60)
        ids = sorted({r["frame_id"] for r in frames.snapshot()})
        assert len(ids) == TOTAL
        assert insp.wait_frames(set(ids), 240)
        assert _wait_rows(pg_dsn, ids, 120) == TOTAL
        codes = pool.stop()
        sink.stop()
        return {"ids": ids, "rows": _rows(pg_dsn, ids), "inspections": insp.snapshot(), "codes": codes,
                "victim": pool.ids[victim] if victim is not None else None, "pool_ids": pool.ids,
                "model": model_identity(onnx_model_path)}
    finally:
        if producer is not None and producer.poll() is None:
            producer.kill()
            producer.wait(10)
        pool.stop()
        if sink.thread.is_alive():
            sink.sink.stop()
            sink.thread.join(60)
        frames.close()
        insp.close()


def _check_rows(out: dict[str, Any]) -> None:
    rows = out["rows"]
    assert len(rows) == TOTAL
    assert sorted(r[0] for r in rows) == out["ids"]  # exactly one row per frame, none missing
    for _fid, model_name, model_version, timings, total_ms, worker_id, batch_size, verdict, _cam, _line in rows:
        assert (model_name, model_version) == out["model"]
        assert {"queue_ms", "fetch_ms", "decode_ms", "infer_ms", "postprocess_ms", "total_ms"} <= set(timings)
        assert timings["infer_ms"] > 0 and total_ms is not None and total_ms >= timings["queue_ms"]
        assert worker_id in out["pool_ids"] and 1 <= batch_size <= 8 and verdict in ("PASS", "FAIL")
    assert len({r[8] for r in rows}) == CAMERAS and len({r[9] for r in rows}) == 2  # 4 cameras on 2 lines


def test_e2e_1000_frames_exactly_one_row_each(settings_factory, pg_dsn, onnx_model_path, tmp_path) -> None:
    out = _run(settings_factory, pg_dsn, onnx_model_path, tmp_path, crash=False)
    _check_rows(out)
    assert out["codes"] == [0, 0, 0]  # clean SIGTERM shutdown
    counts = Counter(r["frame_id"] for r in out["inspections"])
    assert set(counts) == set(out["ids"]) and max(counts.values()) == 1  # no rebalance: no redelivery


def test_e2e_worker_sigkilled_mid_run_loses_nothing(settings_factory, pg_dsn, onnx_model_path, tmp_path) -> None:
    out = _run(settings_factory, pg_dsn, onnx_model_path, tmp_path, crash=True)
    _check_rows(out)
    victim = out["victim"]
    assert victim is not None
    codes = dict(zip(out["pool_ids"], out["codes"], strict=True))
    assert codes[victim] == -signal.SIGKILL and all(c == 0 for w, c in codes.items() if w != victim)
    # survivors took over the victim's partitions: frames after the kill were inspected by them
    by_worker = Counter(r["worker_id"] for r in out["inspections"])
    assert by_worker[victim] >= 40 and sum(n for w, n in by_worker.items() if w != victim) > 0
    counts = Counter(r["frame_id"] for r in out["inspections"])
    assert set(counts) == set(out["ids"])  # Kafka may hold duplicates (at-least-once); PostgreSQL does not
