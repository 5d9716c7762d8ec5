"""Active learning (issue #21 section 2): the worker's marks (uncertain near the threshold, seg_disagree),
their Kafka headers, the sampler (per-line rate, per-hour cap kept in PostgreSQL across restarts), the
worker -> sink -> review_queue path, challenger disagreements, the dashboard queue and the export of a
missed defect with its candidate boxes."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY

from inference_workers.detections import Detections
from inference_workers.detector import Thresholds
from inference_workers.review import ReviewPolicy
from infra.review_queue import (
    MAX_DETAIL_BYTES,
    REVIEW_DETAIL_HEADER,
    REVIEW_HEADER,
    ReviewItem,
    Sampler,
    decode_headers,
    encode_headers,
    hour_allowance,
    in_sample,
    item_from_record,
)

NAMES = ("scratch", "dent", "spot")


def _dets(*rows: tuple[int, float], area_px: list[float] | None = None) -> Detections:
    n = len(rows)
    xyxy = np.array([[10, 10, 30, 30]] * n, np.float32).reshape(-1, 4)
    data = {} if area_px is None else {"area_px": np.array(area_px, np.float64), "length_px": np.zeros(n)}
    return Detections(xyxy, np.array([s for _, s in rows], np.float32), np.array([c for c, _ in rows], np.int64),
                      NAMES, None, data)


THR = Thresholds(default_score=0.5, per_class={"dent": 0.7})


@pytest.mark.parametrize(("dets", "cands", "uncertain", "margin"), [
    (((0, 0.55),), (), True, 0.05),  # FAIL just above its threshold
    (((0, 0.9),), (), False, None),  # a sure FAIL
    (((1, 0.65),), (), True, -0.05),  # dent's own threshold (0.7): below it, near
    ((), ((0, 0.45),), True, -0.05),  # a PASS frame with a candidate just below
    ((), ((2, 0.2),), False, None),  # a sure PASS
    ((), (), False, None),  # nothing at all
    (((0, 0.95),), ((2, 0.45),), False, None),  # the strongest evidence decides, not the weakest
])
def test_band_marks_frames_near_their_threshold(dets: Any, cands: Any, uncertain: bool, margin: float | None) -> None:
    marks = ReviewPolicy(band=0.1, top_k=5, min_mask_frac=0).mark(_dets(*dets), THR, _dets(*cands) if cands else None)
    assert ("uncertain" in marks.reasons) is uncertain
    if margin is not None:
        assert marks.margin == pytest.approx(margin, abs=1e-4)
    if uncertain and cands:
        assert [c["score"] for c in marks.candidates] == [pytest.approx(s, abs=1e-4) for _, s in cands]
    # with a calibrated image-level threshold, that one is the operating point
    img = Thresholds(default_score=0.1, image_score=0.6)
    assert "uncertain" in ReviewPolicy(band=0.1, min_mask_frac=0).mark(_dets((0, 0.55)), img).reasons
    assert not ReviewPolicy(band=0.1, min_mask_frac=0).mark(_dets((0, 0.35)), img).reasons


def test_seg_disagree_when_a_box_gets_almost_no_mask() -> None:
    rp = ReviewPolicy(band=0.0, min_mask_frac=0.05)  # box area 400 px
    assert rp.mark(_dets((0, 0.9), area_px=[10.0]), THR).reasons == ("seg_disagree",)
    assert rp.mark(_dets((0, 0.9), area_px=[200.0]), THR).reasons == ()
    assert rp.mark(_dets((0, 0.3), area_px=[0.0]), THR).reasons == ()  # below threshold: not a defect anyway
    assert rp.mark(_dets((0, 0.9)), THR).reasons == ()  # no masks: nothing to disagree with


def test_headers_round_trip_and_stay_bounded() -> None:
    cands = [{"class_id": 0, "class_name": "x" * 200, "score": 0.4, "x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}] * 40
    h = encode_headers(("uncertain", "seg_disagree"), 0.45, -0.05, cands)
    assert dict(h)[REVIEW_HEADER] == b"uncertain,seg_disagree"
    assert len(dict(h)[REVIEW_DETAIL_HEADER]) <= MAX_DETAIL_BYTES
    reasons, detail = decode_headers([("ce_id", b"x"), *h])
    assert reasons == ("uncertain", "seg_disagree") and detail["score"] == 0.45 and 0 < len(detail["candidates"]) < 40
    assert encode_headers((), 0.1, 0.0, cands) == []
    bad = encode_headers(("uncertain",), None, None, [{"class_id": 1, "x1": "evil", "y1": 0, "x2": 1, "y2": 1, "score": 1},
                                                     {"class_id": "2", "x1": 0, "y1": 0, "x2": 1, "y2": 1, "score": 0.3}])
    item = item_from_record({"frame_id": str(uuid.uuid4()), "line_id": "l", "camera_id": "c"}, bad)
    assert item is not None and [c["class_id"] for c in item.candidates] == [2]  # typed, the bad box dropped
    assert decode_headers([(REVIEW_HEADER, b"uncertain,bogus"), (REVIEW_DETAIL_HEADER, b"{not json")]) == (
        ("uncertain",), {})
    # hostile details never raise (the sink would crash-loop on the record) and never reach jsonb as NaN/inf
    rec = {"frame_id": str(uuid.uuid4()), "line_id": "l", "camera_id": "c"}
    for detail in (b"[" * 3000, b'{"candidates": [{"class_id": 1e400, "score": 0.3, "x1": 0, "y1": 0, "x2": 1, "y2": 1}]}',
                   b'{"score": NaN, "margin": Infinity, "candidates": [{"class_id": 1, "score": NaN, "x1": 0, "y1": 0,'
                   b' "x2": 1e999, "y2": 1}]}'):
        it = item_from_record(rec, [(REVIEW_HEADER, b"uncertain"), (REVIEW_DETAIL_HEADER, detail)])
        assert it is not None and it.reasons == ("uncertain",) and list(it.candidates) == []
        assert it.score is None and it.margin is None and "NaN" not in it.params()["candidates"]
    # the hourly budget released evenly: cap 20 -> one slot at once, then one per 3 minutes
    assert [hour_allowance(20, t) for t in (0, 179, 180, 1800, 3599)] == [1, 1, 2, 11, 20]
    assert hour_allowance(20, 0, spread=False) == 20 and hour_allowance(0, 3000) == 0
    ids = [str(uuid.UUID(int=i)) for i in range(2000)]
    share = sum(in_sample(f, 0.25) for f in ids) / len(ids)
    assert 0.2 < share < 0.3 and [in_sample(f, 0.25) for f in ids] == [in_sample(f, 0.25) for f in ids]


def test_candidates_are_the_sub_threshold_boxes_of_the_frame(onnx_model_path: Path) -> None:
    import cv2

    from inference_workers.detector import Detector, make_session
    from inference_workers.inference import OnnxDetector
    from sqis.bench.harness import render_jpegs

    imgs = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in render_jpegs(2, 128)]
    probe = OnnxDetector(Detector(make_session(onnx_model_path, "cpu", 1)))
    top = max(s for s in probe.run(imgs).max_scores if s is not None)
    thr = Thresholds(default_score=min(1.0, top + 0.02))  # every box just below the threshold: PASS
    model = OnnxDetector(Detector(make_session(onnx_model_path, "cpu", 1), thr))
    out, fwd = model.detect_batch(imgs)
    out = model.finish(imgs, out, fwd)
    assert all(len(r) == 0 for r in out.results)
    cands = model.candidates(fwd, 0, 0.1, 3)
    assert cands is not None and 1 <= len(cands) <= 3
    assert all(thr.default_score - 0.1 - 1e-6 <= c < thr.default_score for c in cands.confidence)
    assert (cands.xyxy[:, 2:] <= 128).all() and (cands.xyxy[:, :2] >= 0).all()  # in the frame's pixels
    marks = ReviewPolicy(band=0.1, top_k=3).mark(out.results[0], thr, cands)
    assert marks.reasons == ("uncertain",) and len(marks.candidates) == len(cands)
    assert model.candidates(None, 0, 0.1, 3) is None  # no forward pass (duck-typed detector)


def _item(line: str, reason: str = "uncertain", fid: str | None = None) -> ReviewItem:
    return ReviewItem(fid or str(uuid.uuid4()), line, (reason,), camera_id="cam-1", score=0.3, margin=-0.02,
                      candidates=[{"class_id": 0, "class_name": "scratch", "score": 0.3, "x1": 1, "y1": 2, "x2": 9,
                                   "y2": 9}])


def _queued(pg_conn: Any, line: str) -> int:
    return pg_conn.execute("SELECT count(*) FROM review_queue WHERE line_id = %s", (line,)).fetchone()[0]


def test_sampler_rate_and_hourly_cap_hold_across_a_restart(pg_conn: Any, unique_id: str) -> None:
    a, b = f"La{unique_id}", f"Lb{unique_id}"
    first = [_item(a) for _ in range(5)]
    res = Sampler(rate=1.0, per_hour=3, spread=False).offer(pg_conn, first)
    assert (res.queued, res.dropped_cap) == (3, 2) and _queued(pg_conn, a) == 3
    # a restarted sampler (a new process) sees the same hour's rows: the cap still holds
    again = Sampler(rate=1.0, per_hour=3, spread=False)
    res = again.offer(pg_conn, [_item(a), _item(a)])
    assert (res.queued, res.dropped_cap) == (0, 2) and _queued(pg_conn, a) == 3
    # a frame already queued is merged (a second reason), never counted twice; other lines have their own cap
    res = again.offer(pg_conn, [_item(a, "challenger_disagree", fid=first[0].frame_id), _item(b)])
    assert (res.merged, res.queued) == (1, 1) and _queued(pg_conn, a) == 3
    reasons = pg_conn.execute("SELECT reasons FROM review_queue WHERE frame_id = %s", (first[0].frame_id,)).fetchone()
    assert reasons[0] == ["challenger_disagree", "uncertain"]
    # the rate: a per-line override, and the same frames are picked by every sampler (a hash, not a draw)
    c = f"Lc{unique_id}"
    items = [_item(c) for _ in range(200)]
    res = Sampler(rate=1.0, per_hour=1000, line_rate={c: 0.2}, spread=False).offer(pg_conn, items)
    assert 20 <= res.queued <= 60 and res.queued + res.dropped_rate == 200
    picked = {r[0] for r in pg_conn.execute("SELECT frame_id::text FROM review_queue WHERE line_id = %s", (c,))}
    assert picked == {it.frame_id for it in items if in_sample(it.frame_id, 0.2)}
    # a cap per line from the settings' JSON
    s = Sampler(per_hour=0, line_per_hour={b: 2}, spread=False)
    assert s.cap_for(b) == 2 and s.cap_for(a) == 0
    assert s.offer(pg_conn, [_item(b), _item(b)]).queued == 1  # b already had one this hour


def test_marked_frames_reach_the_queue_through_worker_and_sink(settings_factory: Any, worker_factory: Any,
                                                               onnx_model_path: Path, pg_conn: Any,
                                                               unique_id: str) -> None:
    import cv2

    from inference_workers.detector import Detector, make_session
    from inference_workers.inference import OnnxDetector
    from sinks.postgres import PostgresSink
    from sqis.bench.harness import FramePublisher, TopicCollector, render_jpegs

    jpegs = render_jpegs(16, 128, seed=3)
    imgs = [cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR) for j in jpegs]
    tops = [float(t or 0.0) for t in OnnxDetector(Detector(make_session(onnx_model_path, "cpu", 1))).run(imgs).max_scores]
    # the widest set of frames whose top scores lie within 0.05: a threshold just above them makes every
    # one an uncertain PASS (whatever the model: the untrained one scores all frames alike, the demo one not)
    order = sorted(range(len(tops)), key=tops.__getitem__)
    group = max(([j for j in order if tops[i] <= tops[j] <= tops[i] + 0.05] for i in order), key=len)
    thr = Thresholds(default_score=min(1.0, max(tops[j] for j in group) + 0.02))
    s = settings_factory(review_band=0.1, review_candidates=2, review_per_hour=3, review_spread=False)
    pub = FramePublisher(s, cameras=2, lines=2, size=128)
    pub.images = [jpegs[j] for j in group]
    for cam in pub.cameras:  # lines of this test only: the hourly cap counts per line
        cam.line_id = f"{cam.line_id}-{unique_id}"
    insp = TopicCollector(s, "inspections")
    refs = pub.prepare(8)
    w = worker_factory(s, thresholds=thr, max_batch=4, max_wait_ms=30)
    try:
        pub.publish(refs)
        assert insp.wait_frames({r["frame_id"] for r in refs}, 120)
        w.stop()
        recs, meta = insp.snapshot(), list(insp.meta)
    finally:
        insp.close()
        pub.close()
    assert all(r["verdict"] == "PASS" and not r["detections"] for r in recs)
    heads = [dict(m["headers"] or []) for m in meta]
    assert all(h.get(REVIEW_HEADER) == b"uncertain" for h in heads)
    sink = PostgresSink(s, group_id=f"g-{unique_id}", batch_size=4, max_wait_ms=200)
    sink.run(max_messages=8)
    lines = sorted({r["line_id"] for r in refs})
    rows = pg_conn.execute("SELECT line_id, reasons, source, score, margin, candidates FROM review_queue"
                           " WHERE line_id = ANY(%s)", (lines,)).fetchall()
    assert sorted(r[0] for r in rows) == sorted(lines * 3)  # 4 frames per line, 3 queued under the cap
    assert sink.stats.review_queued == 6
    for line in lines:  # the frame over the cap is counted as dropped, per line and reason
        assert REGISTRY.get_sample_value("sqis_review_dropped_total", {
            "line_id": line, "reason": "uncertain", "why": "cap"}) == 1
        assert REGISTRY.get_sample_value("sqis_review_queued_total", {
            "line_id": line, "reason": "uncertain", "source": "auto"}) == 3
    for _line, reasons, source, score, margin, cands in rows:
        assert reasons == ["uncertain"] and source == "auto" and -0.1 <= margin < 0 and score < thr.default_score
        assert 1 <= len(cands) <= 2 and {"class_name", "x1", "y2", "score"} <= cands[0].keys()
    # a restarted sink replaying the topic (a new group) queues nothing more: idempotent and capped
    again = PostgresSink(s, group_id=f"g2-{unique_id}", batch_size=8, max_wait_ms=200)
    again.run(max_messages=8)
    assert again.stats.review_queued == 0
    assert pg_conn.execute("SELECT count(*) FROM review_queue WHERE line_id = ANY(%s)", (lines,)).fetchone()[0] == 6


def _pass_frame(pg_conn: Any, store: Any, line: str) -> str:
    import cv2

    fid = str(uuid.uuid4())
    ok, buf = cv2.imencode(".png", np.full((100, 200, 3), 128, np.uint8))
    uri = store.put(f"frames/{line}/cam-1/{fid}.png", buf.tobytes(), "image/png")
    pg_conn.execute(
        "INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at, image_uri, width,"
        " height, model_name, model_version, verdict, n_defects, thresholds, timings, batch_size, worker_id)"
        " VALUES (%s, %s, 'cam-1', 0, now(), now(), %s, 200, 100, 'm', '1', 'PASS', 0, '{}', '{}', 1, 'w')",
        (fid, line, uri))
    return fid


def test_queue_view_operator_picks_and_missed_defect_export(settings_factory: Any, pg_conn: Any, unique_id: str,
                                                           tmp_path: Path) -> None:
    from dashboard import queries as q
    from infra.objectstore import open_store
    from stream_processors.shadow import ShadowJoin, write_agreement
    from training.reviewed import export_reviewed

    s = settings_factory(create_topics=False)
    store = open_store(s)
    line = f"Lq{unique_id}"
    since = datetime.now(UTC) - timedelta(seconds=1)
    missed, bare, picked = (_pass_frame(pg_conn, store, line) for _ in range(3))
    # a champion/challenger disagreement: the challenger failed a frame the champion passed
    join = ShadowJoin()
    base = {"line_id": line, "camera_id": "cam-1", "captured_at": 1_764_000_000_000_000, "model_name": "m"}
    join.add_production(base | {"frame_id": missed, "model_version": "1", "verdict": "PASS", "detections": []})
    join.add_shadow(base | {"frame_id": missed, "model_version": "2", "verdict": "FAIL", "detections": [
        {"class_id": 1, "class_name": "dent", "score": 0.8, "x1": 20.0, "y1": 10.0, "x2": 60.0, "y2": 50.0}]})
    write_agreement(pg_conn, join, Sampler(rate=1.0, per_hour=5, spread=False))
    Sampler(rate=1.0, per_hour=5, spread=False).offer(pg_conn, [ReviewItem(bare, line, ("uncertain",))])  # no candidates
    q.queue_for_review(pg_conn, picked, "operator-1")  # an operator's pick: no rate, no cap
    with pytest.raises(q.DashboardError):
        q.queue_for_review(pg_conn, uuid.uuid4(), "operator-1")
    queue = q.review_queue(pg_conn, q.Filters(line=line))
    assert [str(r["frame_id"]) for r in queue] == [missed, bare, picked]  # oldest first
    assert queue[0]["reasons"] == ["challenger_disagree"] and queue[0]["n_candidates"] == 1
    assert queue[2]["source"] == "operator" and queue[2]["reasons"] == ["operator"]
    assert q.inspection(pg_conn, missed)["queued"]["candidates"][0]["class_name"] == "dent"
    q.set_review(pg_conn, missed, "missed_defect", "qe", "dent under the glare")
    q.set_review(pg_conn, bare, "missed_defect", "qe")
    assert [str(r["frame_id"]) for r in q.review_queue(pg_conn, q.Filters(line=line))] == [picked]  # reviewed: gone
    card = export_reviewed(s, tmp_path / "reviewed", since=since)
    labels = {p.stem: p.read_text().split() for p in (tmp_path / "reviewed" / "labels").rglob("*.txt")}
    assert set(labels) == {missed}  # the missed defect without candidates is not exported as a guess
    cls, cx, cy, w, h = labels[missed]
    assert cls == "0" and [float(v) for v in (cx, cy, w, h)] == pytest.approx([0.2, 0.3, 0.2, 0.4], abs=1e-3)
    assert any("missed defect(s) without candidate boxes" in n for n in card.notes)
