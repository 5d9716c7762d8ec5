"""PostgresSink against the real stack: rows + defects, idempotent redelivery, DLQ, clean stop."""

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

from infra.kafka import consumer, producer
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import deserialize, serialize
from sinks.postgres import PostgresSink


def inspection(i: int, *, n_defects: int = 0, frame_id: str | None = None, inspected_at: int = 0) -> dict[str, Any]:
    dets = [
        {"class_id": k, "class_name": f"class{k}", "score": 0.5 + k / 100, "x1": 1.0, "y1": 2.0, "x2": 30.0,
         "y2": 40.0, "mask": {"height": 4, "width": 4, "counts": [3, 5, 8], "area": 5} if k == 0 else None}
        for k in range(n_defects)
    ]
    base = 1_764_000_000_000_000
    return {
        "frame_id": frame_id or str(uuid.uuid4()), "line_id": "line-1", "camera_id": f"cam-{i % 3}", "seq": i,
        "part_id": None if i % 2 else f"part-{i}", "captured_at": base + i, "inspected_at": inspected_at or base + i + 5000,
        "image_uri": f"file:///objs/{i}.jpg", "width": 640, "height": 480, "model_name": "yolo",
        "model_version": "3", "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {"class0": 0.5}},
        "verdict": "FAIL" if dets else "PASS", "detections": dets,
        "timings": {"queue_ms": 1.0, "fetch_ms": 2.0, "decode_ms": 3.0, "infer_ms": 4.0, "postprocess_ms": 0.5,
                    "segment_ms": 0.0, "total_ms": 10.5},
        "batch_size": 4, "worker_id": "w-1", "source_partition": 0, "source_offset": i,
    }


def produce(s: Settings, records: list[dict[str, Any]], raw: dict[int, bytes] | None = None) -> None:
    """Produce the records in order to one partition; ``raw[i]`` inserts garbage before record i."""
    p = producer(s, client_id="test")
    topic = TopicCatalog(s.topic_prefix).inspections
    for i, rec in enumerate(records):
        if raw and i in raw:
            p.produce(topic, value=raw[i], key=b"cam-x", partition=0)
        value, headers = serialize("inspection", rec)
        p.produce(topic, value=value, key=rec["camera_id"].encode(), headers=headers, partition=0)
    assert p.flush(30) == 0


def run_sink(s: Settings, group: str, **kw: Any) -> PostgresSink:
    sink = PostgresSink(s, group_id=group, batch_size=kw.pop("batch_size", 4), max_wait_ms=200)
    sink.run(**kw)
    return sink


def count(pg_conn: Any, frame_ids: list[str], table: str = "inspections") -> int:
    return pg_conn.execute(f"SELECT count(*) FROM {table} WHERE frame_id = ANY(%s::uuid[])", (frame_ids,)).fetchone()[0]


def test_rows_and_defects_written(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    recs = [inspection(i, n_defects=i % 3) for i in range(10)]
    produce(s, recs)
    sink = run_sink(s, f"g-{unique_id}", max_messages=10)
    ids = [r["frame_id"] for r in recs]

    assert sink.stats.messages == 10 and sink.stats.rows_written == 10 and sink.stats.dead_lettered == 0
    assert count(pg_conn, ids) == 10
    assert count(pg_conn, ids, "defects") == sum(i % 3 for i in range(10))

    r = recs[5]  # 2 defects, the first with a mask
    row = pg_conn.execute(
        "SELECT line_id, camera_id, seq, part_id, verdict, n_defects, model_version, total_ms, "
        "thresholds->>'iou', timings->>'infer_ms', extract(epoch FROM captured_at) * 1e6 "
        "FROM inspections WHERE frame_id = %s", (r["frame_id"],)).fetchone()
    assert row[:7] == ("line-1", "cam-2", 5, None, "FAIL", 2, "3")
    assert row[7] == 10.5 and float(row[8]) == 0.45 and float(row[9]) == 4.0
    assert int(row[10]) == r["captured_at"]
    defects = pg_conn.execute(
        "SELECT idx, class_name, x2, mask_rle, mask_area FROM defects WHERE frame_id = %s ORDER BY idx",
        (r["frame_id"],)).fetchall()
    assert defects == [(0, "class0", 30.0, {"height": 4, "width": 4, "counts": [3, 5, 8]}, 5),
                       (1, "class1", 30.0, None, None)]


def test_redelivery_keeps_one_row_per_frame(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    recs = [inspection(i, n_defects=2) for i in range(6)]
    ids = [r["frame_id"] for r in recs]
    produce(s, recs)
    run_sink(s, f"g-{unique_id}", max_messages=6)
    produce(s, recs)  # the same frames again, as after a worker crash
    again = run_sink(s, f"g-{unique_id}", max_messages=6)  # resumes after the committed offsets
    assert again.stats.messages == 6
    assert count(pg_conn, ids) == 6 and count(pg_conn, ids, "defects") == 12

    # a new group re-reads all 12 messages (duplicates inside one batch too): still one row per frame
    fresh = run_sink(s, f"g2-{unique_id}", max_messages=12, batch_size=12)
    assert fresh.stats.messages == 12
    assert count(pg_conn, ids) == 6 and count(pg_conn, ids, "defects") == 12


def test_newer_inspection_wins_over_late_older_one(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    fid = str(uuid.uuid4())
    newer = inspection(1, n_defects=1, frame_id=fid, inspected_at=2_000_000_000_000_000)
    older = inspection(1, n_defects=3, frame_id=fid, inspected_at=1_900_000_000_000_000)
    produce(s, [newer])
    run_sink(s, f"g-{unique_id}", max_messages=1)
    produce(s, [older])
    sink = run_sink(s, f"g-{unique_id}", max_messages=1)
    assert sink.stats.rows_skipped == 1
    assert pg_conn.execute("SELECT n_defects FROM inspections WHERE frame_id = %s", (fid,)).fetchone() == (1,)
    assert count(pg_conn, [fid], "defects") == 1


def test_garbage_goes_to_dlq_and_the_partition_moves_on(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    bad_id = inspection(9, frame_id="not-a-uuid")
    recs = [inspection(0), inspection(1), bad_id, inspection(3)]
    produce(s, recs, raw={1: b"\x00garbage\xff"})  # garbage between record 0 and record 1
    sink = run_sink(s, f"g-{unique_id}", max_messages=5)
    assert sink.stats.dead_lettered == 2 and sink.stats.rows_written == 3
    good = [recs[0]["frame_id"], recs[1]["frame_id"], recs[3]["frame_id"]]
    assert count(pg_conn, good) == 3

    c = consumer(s, group_id=f"dlq-{unique_id}", client_id="test")
    c.subscribe([TopicCatalog(s.topic_prefix).frames_dlq])
    letters: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(letters) < 2 and time.monotonic() < deadline:
        m = c.poll(0.5)
        if m is not None and not m.error():
            letters.append(deserialize("frame_dlq", m.value(), m.headers()) | {"_headers": dict(m.headers())})
    c.close()
    letters.sort(key=lambda d: d["source_offset"])
    inspections = TopicCatalog(s.topic_prefix).inspections
    for d in letters:  # the same plain error headers as the worker's dead letters
        assert d["_headers"]["sqis-error-type"] == d["error_type"].encode()
        assert d["_headers"]["sqis-source"] == f"{inspections}[0]@{d['source_offset']}".encode()
        assert d["_headers"]["sqis-error-message"]
    assert [d["source_offset"] for d in letters] == [1, 3]
    assert letters[0]["original_value"] == b"\x00garbage\xff"
    assert letters[0]["error_type"] == "SchemaError"
    assert letters[0]["source_topic"] == TopicCatalog(s.topic_prefix).inspections
    assert letters[1]["error_type"] == "RecordError" and "not-a-uuid" in letters[1]["error_message"]

    # the dead-lettered offsets were committed with the batch: nothing is redelivered
    again = run_sink(s, f"g-{unique_id}", idle_timeout_s=3)
    assert again.stats.messages == 0


def test_stop_flushes_the_pending_batch(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    recs = [inspection(i) for i in range(5)]
    produce(s, recs)
    # the batch can neither fill up nor time out: only stop() writes it
    sink = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=1000, max_wait_ms=600_000)
    t = threading.Thread(target=sink.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 60
    while sink.stats.messages < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.stats.messages == 5
    assert count(pg_conn, [r["frame_id"] for r in recs]) == 0
    sink.stop()
    t.join(30)
    assert not t.is_alive()
    assert count(pg_conn, [r["frame_id"] for r in recs]) == 5
    assert sink.stats.batches == 1 and sink.stats.commits == 1


def test_cli_sink_stops_on_sigterm(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    recs = [inspection(i, n_defects=1) for i in range(4)]
    produce(s, recs)
    exe = Path(sys.executable).with_name("sqis")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SQIS_")}
    proc = subprocess.Popen(
        [str(exe), "sink", "postgres", "--state-dir", str(s.state_dir), "--topic-prefix", s.topic_prefix,
         "--group", f"g-{unique_id}", "--batch-size", "2", "--max-wait-ms", "100"],
        env=env | {"SQIS_KAFKA_SESSION_TIMEOUT_MS": "2000", "SQIS_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
                   "SQIS_LOCAL": "1"},  # the endpoints from the session stack's stack.json
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ids = [r["frame_id"] for r in recs]
        deadline = time.monotonic() + 60
        while count(pg_conn, ids) < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
        assert count(pg_conn, ids) == 4
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert "sink finished" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_segmentation_fields_are_written(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    """Inspection v2's mask outline, physical size, mask_uri, segmenter and verdict_rules reach PostgreSQL
    (migration 004)."""
    s = settings_factory()
    rec = inspection(1, n_defects=2)
    rec["detections"][0].update(polygon=[1.0, 2.0, 30.0, 2.0, 30.0, 40.0], area_mm2=0.0125, length_mm=2.5)
    rec.update(mask_uri="file:///objs/masks/1.png", segmenter="yolo-seg:kolektor-seg@1",
               verdict_rules=["length_mm>2:class0"])
    produce(s, [rec])
    run_sink(s, f"g-{unique_id}", max_messages=1)
    row = pg_conn.execute("SELECT mask_uri, segmenter, verdict_rules FROM inspections WHERE frame_id = %s",
                          (rec["frame_id"],)).fetchone()
    assert row == ("file:///objs/masks/1.png", "yolo-seg:kolektor-seg@1", ["length_mm>2:class0"])
    defects = pg_conn.execute("SELECT idx, polygon, area_mm2, length_mm FROM defects WHERE frame_id = %s ORDER BY idx",
                              (rec["frame_id"],)).fetchall()
    assert defects == [(0, [1.0, 2.0, 30.0, 2.0, 30.0, 40.0], 0.0125, 2.5), (1, None, None, None)]
