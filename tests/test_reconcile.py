"""`sqis reconcile` (#8 item 12) against the real stack: frames in the store with no inspection are found,
dead-lettered ones told apart, orphan inspections listed, and --republish sends the same frame_ids."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import pytest

from infra.db import connect
from infra.kafka import producer
from infra.objectstore import open_store
from schemas.catalog import TopicCatalog
from schemas.deadletter import dead_letter
from sqis.bench.harness import TopicCollector
from sqis.cli import run


def _jpeg() -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((24, 40, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


def _put_frame(store: Any, fid: str) -> str:
    d = datetime.now(UTC)
    return store.put(f"frames/line-1/cam-07/{d:%Y}/{d:%m}/{d:%d}/{fid}.jpg", _jpeg())


def _insert(dsn: str, fid: str, uri: str) -> None:
    with connect(dsn, autocommit=True) as c:
        c.execute("INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at, image_uri,"
                  " width, height, model_name, model_version, verdict) VALUES (%s, 'line-1', 'cam-07', 1, now(),"
                  " now(), %s, 40, 24, 'm', '1', 'PASS')", (fid, uri))


def test_reconcile_finds_lost_frames_and_republishes_them(settings_factory: Any, capsys: pytest.CaptureFixture[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    s = settings_factory()
    monkeypatch.setenv("SQIS_OBJECT_STORE_URL", s.object_store_url)
    store = open_store(s)
    dsn = s.dsn()
    inspected, lost1, lost2, dlqd, orphan = (str(uuid.uuid4()) for _ in range(5))
    _insert(dsn, inspected, _put_frame(store, inspected))
    for fid in (lost1, lost2, dlqd):
        _put_frame(store, fid)
    _insert(dsn, orphan, store.url.rstrip("/") + f"/frames/line-1/cam-07/2026/01/01/{orphan}.jpg")
    cat = TopicCatalog(s.topic_prefix)
    p = producer(s, client_id="seed")
    v, h = dead_letter(source_topic=cat.frames, source_partition=0, source_offset=1, key=b"cam-07", value=b"x",
                       headers=None, error_type="corrupt_image", error_message="bad", worker_id="w", frame_id=dlqd)
    p.produce(cat.frames_dlq, value=v, headers=h)
    assert p.flush(30) == 0

    flags = ["--since", "1h", "--grace-s", "0", "--bootstrap", s.bootstrap(), "--topic-prefix", s.topic_prefix,
             "--state-dir", str(s.state_dir)]
    assert run(["reconcile", *flags, "--json"]) == 3  # frames lost, not republished: exit 3
    out = json.loads(capsys.readouterr().out)
    assert out["checked"] == 4
    assert sorted(out["missing"]) == sorted([lost1, lost2])
    assert out["dead_lettered"] == [dlqd] and out["orphans"] == [orphan]

    frames = TopicCollector(s, "frames")
    try:
        assert run(["reconcile", *flags, "--republish"]) == 0
        text = capsys.readouterr().out
        assert "2 missing, 1 dead-lettered, 1 orphan" in text and "republished 2" in text
        deadline = time.monotonic() + 30
        while len(frames.records) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        got = {r["frame_id"]: r for r in frames.records}
        assert set(got) == {lost1, lost2}
        ref = got[lost1]
        assert (ref["camera_id"], ref["line_id"], ref["width"], ref["height"], ref["encoding"]) == (
            "cam-07", "line-1", 40, 24, "jpeg")
        assert ref["uri"].endswith(f"{lost1}.jpg") and ref["size_bytes"] == len(_jpeg())
    finally:
        frames.close()
