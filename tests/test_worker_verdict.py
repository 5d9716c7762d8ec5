"""Verdict rule and the Inspection record (it must serialize with schemas/avro/inspection.avsc)."""

from __future__ import annotations

from inference_workers.detector import Detection, Thresholds
from inference_workers.verdict import FAIL, PASS, Timings, build_inspection, decide
from schemas.serde import deserialize, serialize


def _det(name: str, score: float, cid: int = 0) -> Detection:
    return Detection(cid, name, score, 1.0, 2.0, 30.0, 40.0)


def test_fail_only_when_a_detection_reaches_its_class_threshold() -> None:
    thr = Thresholds(default_score=0.5, per_class={"scratch": 0.8})
    assert decide([], thr) == PASS
    assert decide([_det("scratch", 0.79)], thr) == PASS
    assert decide([_det("scratch", 0.8)], thr) == FAIL
    assert decide([_det("dent", 0.49), _det("scratch", 0.7)], thr) == PASS
    assert decide([_det("dent", 0.5)], thr) == FAIL


def test_inspection_record_round_trips_through_the_schema() -> None:
    ref = {"frame_id": "f-1", "line_id": "line-1", "camera_id": "cam-01", "seq": 7, "captured_at": 1_000_000,
           "uri": "file:///x/f-1.jpg", "part_id": "P-7"}
    thr = Thresholds(default_score=0.3, iou=0.5, per_class={"dent": 0.6})
    rec = build_inspection(
        ref, detections=[_det("dent", 0.65, 1), _det("scratch", 0.2)], thresholds=thr, model_name="m",
        model_version="4", timings=Timings(1.5, 2.0, 0.5, 10.0, 0.25, 14.25), inspected_at_us=1_014_250,
        batch_size=8, worker_id="w-1", source_partition=3, source_offset=42, width=128, height=96)
    value, headers = serialize("inspection", rec)
    back = deserialize("inspection", value, headers)
    assert back["verdict"] == FAIL
    assert back["model_version"] == "4" and back["thresholds"]["per_class"] == {"dent": 0.6000000238418579}
    assert [d["class_name"] for d in back["detections"]] == ["dent", "scratch"]
    assert back["timings"]["infer_ms"] == 10.0 and back["timings"]["segment_ms"] == 0.0
    assert (back["source_partition"], back["source_offset"], back["batch_size"]) == (3, 42, 8)
    assert (back["width"], back["height"], back["part_id"]) == (128, 96, "P-7")


def test_calibrated_thresholds_decide_and_are_recorded() -> None:
    """With a calibrated image-level threshold the verdict follows it, and the Inspection says which
    thresholds decided (thresholds.source, thresholds.image_score)."""
    thr = Thresholds(default_score=0.03, per_class={"dent": 0.02}, image_score=0.05,
                     source="calibrated:models:/kolektor/3")
    assert decide([_det("dent", 0.04, 1)], thr) == PASS  # reported (>= 0.02) but below the image threshold
    assert decide([_det("dent", 0.04, 1), _det("scratch", 0.05)], thr) == FAIL
    ref = {"frame_id": "f-2", "line_id": "l", "camera_id": "c", "seq": 1, "captured_at": 1, "uri": "file:///f"}
    rec = build_inspection(ref, detections=[_det("dent", 0.04, 1)], thresholds=thr, model_name="kolektor",
                           model_version="3", timings=Timings(0, 0, 0, 0, 0, 0), inspected_at_us=2, batch_size=1,
                           worker_id="w", source_partition=0, source_offset=0, width=8, height=8)
    back = deserialize("inspection", *serialize("inspection", rec))
    assert back["verdict"] == PASS
    assert back["thresholds"]["source"] == "calibrated:models:/kolektor/3"
    assert abs(back["thresholds"]["image_score"] - 0.05) < 1e-6
