"""Bad input goes to the DLQ with its reason and source offset; the frames after it are inspected."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from typing import Any

import cv2
import numpy as np

from infra.kafka import TopicPartition
from infra.kafka import consumer as make_consumer
from schemas.catalog import TopicCatalog
from schemas.serde import serialize
from sqis.bench.harness import FramePublisher, TopicCollector, settings_env


def _send(pub: FramePublisher, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None,
          offsets: list[int]) -> None:
    def on_delivery(err: Any, msg: Any) -> None:
        assert err is None
        offsets.append(msg.offset())

    pub.send_raw(key, value, headers, on_delivery)
    pub.flush()  # one at a time: offsets are known in order


def test_bad_frames_are_dead_lettered_and_the_partition_moves_on(settings_factory, worker_factory, request) -> None:
    s = settings_factory(partitions={"frames": 1})
    pub = FramePublisher(s, cameras=2, size=96)
    request.addfinalizer(pub.close)
    refs = pub.prepare(6)
    store = pub.store

    # bad FrameRefs: a missing object, a corrupt JPEG, an oversized frame
    missing = dict(refs[1], uri=refs[1]["uri"].replace(".jpg", "-gone.jpg"))
    corrupt_bytes = b"\xff\xd8\xff\xe0" + os.urandom(3000) + b"\xff\xd9"
    corrupt = dict(refs[2], uri=store.put("frames/corrupt.jpg", corrupt_bytes), size_bytes=len(corrupt_bytes),
                   content_sha256=hashlib.sha256(corrupt_bytes).hexdigest())
    noise = np.random.default_rng(0).integers(0, 255, (700, 700, 3), dtype=np.uint8)
    big_bytes = cv2.imencode(".jpg", noise, [cv2.IMWRITE_JPEG_QUALITY, 98])[1].tobytes()
    big = dict(refs[3], uri=store.put("frames/big.jpg", big_bytes), size_bytes=len(big_bytes),
               content_sha256=hashlib.sha256(big_bytes).hexdigest())

    offsets: list[int] = []
    plan: list[tuple[str, dict[str, Any] | None]] = [
        ("ok", refs[0]), ("missing_object", missing), ("undecodable_message", None), ("corrupt_image", corrupt),
        ("oversized_frame", big), ("ok", refs[4]), ("ok", refs[5]),
    ]
    garbage = b"\x00\x01 this is not avro \xfe" * 3
    for _kind, ref in plan:
        if ref is None:
            _send(pub, b"cam-01", garbage, [("sqis-schema", b"deadbeef"), ("x-trace", b"t-1")], offsets)
        else:
            rec = dict(ref, captured_at=1_700_000_000_000_000)
            value, headers = serialize("frame_ref", rec)
            _send(pub, rec["camera_id"].encode(), value, headers, offsets)
    assert offsets == sorted(offsets) and len(offsets) == 7

    dlq = TopicCollector(s, "frames_dlq")
    insp = TopicCollector(s, "inspections")
    group = f"iw-dlq-{offsets[0]}-{os.getpid()}"
    w = worker_factory(s, max_batch=4, max_wait_ms=20, group_id=group, max_frame_bytes=len(big_bytes) - 1)
    try:
        assert dlq.wait_for(lambda r: len(r) >= 4, 60)
        assert insp.wait_for(lambda r: len(r) >= 3, 60)
        stats = w.stop()
        dead, inspected = dlq.snapshot(), insp.snapshot()
        dlq_meta = list(dlq.meta)
    finally:
        dlq.close()
        insp.close()

    frames_topic = TopicCatalog(s.topic_prefix).frames
    want_dead = {off: kind for (kind, _), off in zip(plan, offsets, strict=True) if kind != "ok"}
    assert {d["source_offset"]: d["error_type"] for d in dead} == want_dead
    for d, meta in zip(dead, dlq_meta, strict=True):
        assert d["source_topic"] == frames_topic and d["source_partition"] == 0
        assert d["worker_id"] == w.worker.worker_id and d["error_message"]
        assert meta["headers"]["sqis-error-type"].decode() == d["error_type"]
        assert meta["headers"]["sqis-source"].decode() == f"{frames_topic}[0]@{d['source_offset']}"
        if d["error_type"] == "undecodable_message":
            assert d["original_value"] == garbage and d["frame_id"] is None
            assert d["original_key"] == b"cam-01" and d["original_headers"]["x-trace"] == b"t-1"
        else:
            ref = dict(plan)[d["error_type"]]
            assert ref is not None and d["frame_id"] == ref["frame_id"]
            assert meta["key"] == ref["camera_id"].encode()
    # the good frames, including those after the bad ones, were inspected
    ok_offsets = [off for (kind, _), off in zip(plan, offsets, strict=True) if kind == "ok"]
    assert sorted(i["source_offset"] for i in inspected) == ok_offsets
    assert {i["frame_id"] for i in inspected} == {refs[0]["frame_id"], refs[4]["frame_id"], refs[5]["frame_id"]}
    assert stats.dead_lettered == 4 and stats.inspected == 3

    # and everything was committed after delivery: the group resumes after the last message
    c = make_consumer(s, group_id=group, client_id="check")
    try:
        (tp,) = c.committed([TopicPartition(frames_topic, 0)], timeout=10)
        assert tp.offset == offsets[-1] + 1
    finally:
        c.close()


def test_dlq_show_lists_the_dead_letters(settings_factory, worker_factory, request) -> None:
    s = settings_factory(partitions={"frames": 1})
    pub = FramePublisher(s, cameras=1, size=64)
    request.addfinalizer(pub.close)
    (ref,) = pub.prepare(1)
    rec = dict(ref, captured_at=1_700_000_000_000_000, uri=ref["uri"] + ".missing")
    value, headers = serialize("frame_ref", rec)
    offsets: list[int] = []
    _send(pub, b"cam-01", value, headers, offsets)
    _send(pub, b"cam-01", b"garbage", None, offsets)
    dlq = TopicCollector(s, "frames_dlq")
    w = worker_factory(s, max_batch=2, max_wait_ms=10)
    try:
        assert dlq.wait_for(lambda r: len(r) >= 2, 60)
    finally:
        dlq.close()
        w.stop()

    env = os.environ | settings_env(s)
    out = subprocess.run([sys.executable, "-m", "sqis", "dlq", "show", "--json", "--idle-s", "2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    assert sorted((r["source_offset"], r["error_type"]) for r in rows) == [
        (offsets[0], "missing_object"), (offsets[1], "undecodable_message")]
    assert next(r for r in rows if r["error_type"] == "missing_object")["frame_id"] == ref["frame_id"]

    table = subprocess.run([sys.executable, "-m", "sqis", "dlq", "show", "--idle-s", "2", "--limit", "1"],
                           env=env | {"COLUMNS": "80"}, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    # newest first (#8 item 14): the later record; the reason column keeps its full width in 80 columns
    assert "1 newest dead letters" in table.stdout and "undecodable_message" in table.stdout, table.stdout
    assert "missing_object" not in table.stdout
    assert max(len(line) for line in table.stdout.splitlines()) <= 80
    table = subprocess.run([sys.executable, "-m", "sqis", "dlq", "show", "--idle-s", "2", "--limit", "2"],
                           env=env | {"COLUMNS": "80"}, capture_output=True, text=True, timeout=120)
    lines = table.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if "undecodable_message" in line)
    assert first < next(i for i, line in enumerate(lines) if "missing_object" in line), table.stdout


def test_dlq_reader_stops_exactly_at_the_ends_taken_at_the_start(settings_factory: Any, caplog: Any) -> None:
    """Plain records, a committed transaction (its marker last) and an aborted one: the reader returns
    the 4 readable records and stops at the end offsets, not after an idle timeout (a generous idle_s
    and no 'incomplete' warning), and records written after it started are not read."""
    import logging

    from inference_workers.dlq import read_dead_letters
    from infra.kafka import producer

    s = settings_factory(partitions={"frames_dlq": 2})
    topic = TopicCatalog(s.topic_prefix).frames_dlq
    plain = producer(s, client_id="dlq-plain")
    for p in (0, 1):
        plain.produce(topic, value=b"plain", partition=p)
    assert plain.flush(15) == 0
    tx = producer(s, client_id="dlq-tx", **{"transactional.id": f"dlq-{s.topic_prefix}"})
    tx.init_transactions(15)
    for commit in (True, False):
        tx.begin_transaction()
        tx.produce(topic, value=b"committed" if commit else b"aborted", partition=0)
        tx.produce(topic, value=b"committed" if commit else b"aborted", partition=1)
        tx.flush(15)
        (tx.commit_transaction if commit else tx.abort_transaction)(15)
    caplog.set_level(logging.WARNING, logger="inference_workers.dlq")
    reader = read_dead_letters(s, idle_s=120, max_s=120)
    first = next(reader)
    plain.produce(topic, value=b"later", partition=0)  # after the ends were taken: not read
    assert plain.flush(15) == 0
    recs = [first, *reader]
    assert sorted((r["dlq_partition"], r["dlq_offset"]) for r in recs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert not [r for r in caplog.records if "incomplete" in r.getMessage()]
