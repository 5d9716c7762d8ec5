"""The worker against the real broker: complete inspections, commits, rebalance, outages, model swap."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections import Counter
from typing import Any

import pytest

from inference_workers.detector import Detector, DetectorError, Thresholds, make_session
from inference_workers.verdict import decide
from inference_workers.worker import InferenceWorker
from infra.kafka import TopicPartition
from infra.kafka import consumer as make_consumer
from infra.objectstore import ObjectStoreError, open_store
from infra.stack import free_port
from schemas.catalog import TopicCatalog
from sqis.bench.harness import FramePublisher, TopicCollector, settings_env
from tests.model_fixtures import model_identity


def _committed(s: Any, group: str, partitions: int) -> dict[int, int]:
    topic = TopicCatalog(s.topic_prefix).frames
    c = make_consumer(s, group_id=group, client_id="check")
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
        return {tp.partition: tp.offset for tp in tps}
    finally:
        c.close()


@pytest.fixture
def publisher_factory():
    made: list[FramePublisher] = []

    def factory(s: Any, **kw: Any) -> FramePublisher:
        made.append(FramePublisher(s, **kw))
        return made[-1]

    yield factory
    for p in made:
        p.close()


def test_every_frame_gets_one_complete_inspection(settings_factory, worker_factory, publisher_factory,
                                                  onnx_model_path) -> None:
    port = free_port()
    s = settings_factory(partitions={"frames": 4}, metrics_port=port)
    pub = publisher_factory(s, cameras=4, lines=2, size=128)
    refs = pub.prepare(40)
    insp = TopicCollector(s, "inspections")
    thr = Thresholds(default_score=0.5, iou=0.5, per_class={"dent": 0.6})
    w = worker_factory(s, thresholds=thr, max_batch=8, max_wait_ms=30, group_id="iw-complete-" + s.topic_prefix)
    try:
        pub.publish(refs)
        assert insp.wait_frames({r["frame_id"] for r in refs}, 120)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        stats = w.stop()
        recs, meta = insp.snapshot(), list(insp.meta)
    finally:
        insp.close()

    by_id = {r["frame_id"]: r for r in refs}
    assert sorted(r["frame_id"] for r in recs) == sorted(by_id)  # one each, no duplicates
    for rec, m in zip(recs, meta, strict=True):
        ref = by_id[rec["frame_id"]]
        assert m["key"] == ref["camera_id"].encode()
        for f in ("line_id", "camera_id", "seq"):
            assert rec[f] == ref[f]
        assert rec["image_uri"] == ref["uri"] and (rec["width"], rec["height"]) == (128, 128)
        assert (rec["model_name"], rec["model_version"]) == model_identity(onnx_model_path)
        assert rec["thresholds"]["default_score"] == 0.5 and "dent" in rec["thresholds"]["per_class"]
        assert rec["worker_id"] == w.worker.worker_id and 1 <= rec["batch_size"] <= 8
        t = rec["timings"]
        assert t["infer_ms"] > 0 and t["fetch_ms"] >= 0 and t["decode_ms"] > 0 and t["postprocess_ms"] >= 0
        assert t["total_ms"] >= t["queue_ms"] >= 0
        assert rec["inspected_at"] >= rec["captured_at"]
        assert rec["verdict"] == decide(_dets(rec["detections"]), thr)
    # per camera, source offsets are consecutive in one partition and inspections keep camera order
    cams: dict[str, list[dict[str, Any]]] = {}
    for rec in recs:
        cams.setdefault(rec["camera_id"], []).append(rec)
    for cam_recs in cams.values():
        assert len({r["source_partition"] for r in cam_recs}) == 1
        assert [r["seq"] for r in cam_recs] == sorted(r["seq"] for r in cam_recs)
    assert stats.inspected == 40 and stats.dead_lettered == 0 and stats.batches >= 5
    assert stats.prepared_batches == stats.batches  # every batch's input was made in the fetch pool
    inspected_total = next(float(line.split()[-1]) for line in metrics.splitlines()
                           if line.startswith('sqis_worker_frames_total{outcome="inspected"}'))
    assert inspected_total >= 40  # process-wide counter: at least this worker's frames
    assert "sqis_worker_latency_ms_bucket" in metrics and 'sqis_worker_stage_ms_count{stage="infer"}' in metrics
    # offsets were stored after delivery and committed on stop: the group resumes after the last frame
    ends = {p: max(r["source_offset"] for r in recs if r["source_partition"] == p) + 1
            for p in {r["source_partition"] for r in recs}}
    committed = _committed(s, w.worker.group_id, 4)
    assert {p: committed[p] for p in ends} == ends


def _dets(dets: list[dict[str, Any]]) -> list[Any]:
    from inference_workers.detector import Detection

    return [Detection(d["class_id"], d["class_name"], d["score"], d["x1"], d["y1"], d["x2"], d["y2"]) for d in dets]


def test_missing_model_fails_at_start(settings_factory, tmp_path) -> None:
    s = settings_factory(create_topics=False)
    with pytest.raises(DetectorError):
        InferenceWorker(s, str(tmp_path / "nope.onnx"))
    env = settings_env(s) | {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-m", "sqis", "worker", "--model", str(tmp_path / "nope.onnx")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "cannot load model" in out.stderr and "nope.onnx" in out.stderr and "Traceback" not in out.stderr


class OutageStore:
    """The real store, but every read of one URI fails (transient) until ``heal()``."""

    def __init__(self, inner: Any, bad_uri: str) -> None:
        self.inner, self.bad_uri, self.healed, self.failed_reads = inner, bad_uri, False, 0
        self.url = inner.url

    def heal(self) -> None:
        self.healed = True

    def get(self, uri: str) -> bytes:
        if uri == self.bad_uri and not self.healed:
            self.failed_reads += 1
            raise ObjectStoreError("simulated outage")
        return self.inner.get(uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_store_outage_rewinds_the_partition_instead_of_dead_lettering(settings_factory, worker_factory,
                                                                       publisher_factory) -> None:
    """However long the store stays down (here 25+ rewinds; main gave up after 20 and dead-lettered the
    frame as store_unavailable), the partition waits paused with backoff and a gauge says so."""
    s = settings_factory(partitions={"frames": 1})
    pub = publisher_factory(s, cameras=1, size=64)
    refs = pub.prepare(12)
    store = OutageStore(open_store(s), refs[3]["uri"])
    insp = TopicCollector(s, "inspections")
    dlq = TopicCollector(s, "frames_dlq")
    w = worker_factory(s, store=store, max_batch=4, max_wait_ms=20, rewind_backoff_s=(0.01, 0.02))
    w.worker.fetcher.backoff_s = 0.01
    try:
        pub.publish(refs)
        # frames before the unreachable one are inspected; it and everything after it wait
        assert insp.wait_frames({r["frame_id"] for r in refs[:3]}, 60)
        deadline = time.monotonic() + 60
        while w.worker.stats.rewinds < 25 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert w.worker.stats.rewinds >= 25  # retried again and again, with backoff
        assert w.worker.metrics.registry.get_sample_value("sqis_worker_store_unavailable") == 1.0
        assert {r["frame_id"] for r in insp.snapshot()} == {r["frame_id"] for r in refs[:3]}
        store.heal()
        assert insp.wait_frames({r["frame_id"] for r in refs}, 60)
        stats = w.stop()
        recs = insp.snapshot()
    finally:
        insp.close()
        dlq.close()
    assert Counter(r["frame_id"] for r in recs) == Counter(r["frame_id"] for r in refs)  # no duplicates
    assert [r["source_offset"] for r in recs] == sorted(r["source_offset"] for r in recs)
    assert dlq.snapshot() == [] and stats.dead_lettered == 0
    assert store.failed_reads >= 25 * (1 + w.worker.fetcher.retries)
    assert w.worker.metrics.registry.get_sample_value("sqis_worker_store_unavailable") == 0.0


def test_rebalance_hands_partitions_over_without_loss_or_duplicates(settings_factory, worker_factory,
                                                                     publisher_factory) -> None:
    s = settings_factory(partitions={"frames": 6})
    pub = publisher_factory(s, cameras=6, size=64)
    first, second, third = pub.prepare(60), pub.prepare(60), pub.prepare(60)
    insp = TopicCollector(s, "inspections")
    group = "iw-rebalance-" + s.topic_prefix
    a = worker_factory(s, group_id=group, max_batch=4, max_wait_ms=20, worker_id="wa")
    try:
        pub.publish(first)
        assert insp.wait_frames({r["frame_id"] for r in first}, 120)
        b = worker_factory(s, group_id=group, max_batch=4, max_wait_ms=20, worker_id="wb")
        pub.publish(second, rate_fps=40)  # flowing while the group rebalances
        assert insp.wait_frames({r["frame_id"] for r in first + second}, 120)
        a.stop()  # a leaves: b takes everything over
        pub.publish(third)
        assert insp.wait_frames({r["frame_id"] for r in first + second + third}, 120)
        b.stop()
        recs = insp.snapshot()
    finally:
        insp.close()
    counts = Counter(r["frame_id"] for r in recs)
    assert set(counts) == {r["frame_id"] for r in first + second + third}
    assert max(counts.values()) == 1, [k for k, v in counts.items() if v > 1]
    assert {r["worker_id"] for r in recs} == {"wa", "wb"}
    assert {r["worker_id"] for r in recs if r["frame_id"] in {f["frame_id"] for f in third}} == {"wb"}


def test_promoted_model_is_picked_up_between_batches(settings_factory, worker_factory, publisher_factory,
                                                     onnx_model_path) -> None:
    s = settings_factory(partitions={"frames": 1})
    pub = publisher_factory(s, cameras=1, size=64)
    before, after = pub.prepare(8), pub.prepare(8)
    insp = TopicCollector(s, "inspections")
    w = worker_factory(s, max_batch=4, max_wait_ms=20)
    watcher = w.worker.watcher
    promoted: list[Detector] = []

    def maybe_reload(force: bool = False) -> bool:  # what ModelWatcher does when the alias moves
        if promoted and watcher._current is not promoted[0]:
            watcher._current = promoted[0]
            return True
        return False

    watcher.maybe_reload = maybe_reload
    try:
        pub.publish(before)
        assert insp.wait_frames({r["frame_id"] for r in before}, 60)
        promoted.append(Detector(make_session(onnx_model_path, "cpu", 1), Thresholds(), name="untrained-yolov8n",
                                 version="2"))
        deadline = time.monotonic() + 30
        while w.worker.stats.model_reloads == 0 and time.monotonic() < deadline:
            time.sleep(0.05)  # idle worker: the next loop turn (poll <= 1 s) swaps
        pub.publish(after)
        assert insp.wait_frames({r["frame_id"] for r in before + after}, 60)
        stats = w.stop()
        recs = {r["frame_id"]: r for r in insp.snapshot()}
    finally:
        insp.close()
    assert {recs[r["frame_id"]]["model_version"] for r in before} == {"0"}
    assert {recs[r["frame_id"]]["model_version"] for r in after} == {"2"}
    assert stats.model_reloads == 1
