"""Producers against a real broker (Apache Kafka) and real object stores: publish, spool, replay."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from infra.kafka import consumer
from infra.objectstore import open_store
from infra.settings import Settings
from infra.stack import free_port
from producers import run_producer
from producers.spool import Spool, spool_root
from producers.synthetic import SyntheticSource
from schemas.catalog import TopicCatalog
from schemas.serde import deserialize


def _consume(settings: Settings, n: int, timeout: float = 60.0) -> list[tuple[str, dict[str, Any]]]:
    """Read ``n`` FrameRefs (key, record) from the frames topic, in partition order."""
    c = consumer(settings, group_id=f"test-{uuid.uuid4().hex[:8]}", client_id="test-producers")
    c.subscribe([TopicCatalog(settings.topic_prefix).frames])
    out: list[tuple[str, dict[str, Any]]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append((m.key().decode(), deserialize("frame_ref", m.value(), m.headers())))
        extra = c.poll(1.0)  # nothing beyond the expected n
        if extra is not None and not extra.error():
            out.append((extra.key().decode(), deserialize("frame_ref", extra.value(), extra.headers())))
    finally:
        c.close()
    return out


def _check_objects(settings: Settings, recs: list[tuple[str, dict[str, Any]]]) -> None:
    store = open_store(settings)
    for key, rec in recs:
        assert key == rec["camera_id"]
        data = store.get(rec["uri"])
        assert hashlib.sha256(data).hexdigest() == rec["content_sha256"]
        assert len(data) == rec["size_bytes"]
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        assert img.shape == (rec["height"], rec["width"], 3)
        assert f"/frames/{rec['line_id']}/{rec['camera_id']}/" in rec["uri"]
        assert rec["uri"].endswith(f"/{rec['frame_id']}.jpg")


def test_publishing_synthetic_frames_lands_one_frameref_per_frame(settings_factory, tmp_path: Path) -> None:
    s = settings_factory(state_dir=tmp_path)
    stats = run_producer(s, "synthetic", cameras=2, lines=2, frames=6, defect_rate=0.5, seed=11,
                         install_signal_handlers=False)
    assert stats.produced == 12 and stats.captured == 12
    assert stats.spooled == stats.dropped == stats.failed == stats.spool_pending == 0
    recs = _consume(s, 12)
    assert len(recs) == 12
    assert len({r["frame_id"] for _, r in recs}) == 12
    _check_objects(s, recs)
    by_cam: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for _, r in recs:
        by_cam[r["camera_id"]].append(r)
    assert {c: [r["seq"] for r in rs] for c, rs in by_cam.items()} == {"cam-01": list(range(6)), "cam-02": list(range(6))}
    assert {r["line_id"] for r in by_cam["cam-02"]} == {"line-2"}
    # the published truth is the renderer's ground truth for that seed and camera
    for i, cam in enumerate(("cam-01", "cam-02")):
        src = SyntheticSource(cam, "x", camera_index=i, seed=11, defect_rate=0.5, count=6)
        expected = [f.truth for f in src.frames(threading.Event())]
        got = [[(t["class_name"], t["x1"], t["y1"], t["x2"], t["y2"]) for t in r["truth"]] for r in by_cam[cam]]
        assert len(got) == len(expected)
        for g, e in zip(got, expected, strict=True):
            assert [b[0] for b in g] == [b[0] for b in e]
            assert np.allclose([b[1:] for b in g], [b[1:] for b in e], atol=0.01) if e else g == []


def test_unreachable_broker_spools_frames_and_the_next_run_replays_them(settings_factory, tmp_path: Path) -> None:
    dead = settings_factory(state_dir=tmp_path, kafka_bootstrap=f"127.0.0.1:{free_port()}", create_topics=False)
    stats = run_producer(dead, "synthetic", cameras=2, frames=5, seed=3, drain_timeout_s=1.0,
                         install_signal_handlers=False)
    assert stats.produced == 0 and stats.spooled == 10 and stats.spool_pending == 10
    spool = Spool(spool_root(dead))  # per deployment (#8 item 11)
    spooled_ids = {spool.read(e)[0]["frame_id"] for e in spool.oldest(100)}
    spool.close()
    assert len(spooled_ids) == 10

    live = settings_factory(state_dir=tmp_path, topic_prefix=dead.topic_prefix)
    again = run_producer(live, "synthetic", cameras=2, frames=2, seed=4, install_signal_handlers=False)
    assert again.produced == 14 and again.spool_pending == 0
    assert again.replayed == 10 + again.spooled
    recs = _consume(live, 14)
    assert len(recs) == 14
    assert spooled_ids <= {r["frame_id"] for _, r in recs}
    _check_objects(live, recs)
    by_cam: dict[str, list[int]] = defaultdict(list)
    for _, r in recs:
        by_cam[r["camera_id"]].append(r["captured_at"])
    assert all(ts == sorted(ts) for ts in by_cam.values())  # replayed in capture order, before new frames
    assert not list((tmp_path / "spool").rglob("*.spool"))


def test_frames_spooled_while_the_broker_is_down_are_replayed_when_it_comes_up(
        private_kafka: Any, tmp_path: Path) -> None:
    private_kafka.stop()  # its topics exist; the broker is down when the producer starts
    s = Settings(state_dir=tmp_path, kafka_bootstrap=private_kafka.bootstrap, topic_prefix="",
                 object_store_url=(tmp_path / "objects").as_uri())
    all_spooled = threading.Event()
    result: dict[str, Any] = {}

    def progress(c: dict[str, int]) -> None:
        if c["spooled"] >= 8:
            all_spooled.set()

    def run() -> None:
        result["stats"] = run_producer(s, "synthetic", frames=8, seed=9, drain_timeout_s=90.0,
                                       progress=progress, install_signal_handlers=False)

    t = threading.Thread(target=run)
    t.start()
    try:
        assert all_spooled.wait(60), "frames were not spooled while the broker was down"
        private_kafka.start()  # same port
        t.join(120)
        assert not t.is_alive()
        stats = result["stats"]
        assert stats.produced == 8 and stats.replayed == 8 and stats.spool_pending == 0
        recs = _consume(s, 8)
        assert sorted(r["seq"] for _, r in recs) == list(range(8))
        _check_objects(s, recs)
    finally:
        t.join(120)


def test_video_file_frames_are_resized_and_published(settings_factory, tmp_path: Path) -> None:
    p = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(p), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for i in range(5):
        w.write(np.full((48, 64, 3), 30 * i, np.uint8))
    w.release()
    s = settings_factory(state_dir=tmp_path)
    stats = run_producer(s, "video", path=p, size="32x24", camera_id="cam-video", line_id="line-9",
                         install_signal_handlers=False)
    assert stats.produced == 5
    recs = _consume(s, 5)
    assert [(r["seq"], r["width"], r["height"], r["truth"]) for _, r in recs] == [(i, 32, 24, None) for i in range(5)]
    assert {k for k, _ in recs} == {"cam-video"}
    _check_objects(s, recs)


def test_frames_go_to_an_s3_store(settings_factory, s3_endpoint: str, tmp_path: Path) -> None:
    bucket = f"frames-{uuid.uuid4().hex[:8]}"
    s = settings_factory(state_dir=tmp_path, object_store_url=f"s3://{bucket}/sqis", s3_endpoint_url=s3_endpoint,
                         aws_access_key_id="testing", aws_secret_access_key="testing")
    stats = run_producer(s, "synthetic", frames=3, seed=1, install_signal_handlers=False)
    assert stats.produced == 3
    recs = _consume(s, 3)
    assert len(recs) == 3 and all(r["uri"].startswith(f"s3://{bucket}/sqis/frames/") for _, r in recs)
    _check_objects(s, recs)


def test_unreachable_object_store_spools_and_a_later_run_uploads(settings_factory, s3_endpoint: str,
                                                                  tmp_path: Path) -> None:
    bucket = f"late-{uuid.uuid4().hex[:8]}"
    creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
    down = settings_factory(state_dir=tmp_path, object_store_url=f"s3://{bucket}/p",
                            s3_endpoint_url=f"http://127.0.0.1:{free_port()}", **creds)
    stats = run_producer(down, "synthetic", frames=4, seed=2, drain_timeout_s=1.0, install_signal_handlers=False)
    assert stats.produced == 0 and stats.spooled == 4 and stats.spool_pending == 4
    assert _consume(down, 0, timeout=2.0) == []  # no FrameRef may point at an object that is not there

    up = settings_factory(state_dir=tmp_path, topic_prefix=down.topic_prefix, object_store_url=f"s3://{bucket}/p",
                          s3_endpoint_url=s3_endpoint, **creds)
    again = run_producer(up, "synthetic", frames=1, seed=5, install_signal_handlers=False)
    assert again.produced == 5 and again.replayed >= 4 and again.spool_pending == 0
    recs = _consume(up, 5)
    assert len(recs) == 5
    _check_objects(up, recs)
