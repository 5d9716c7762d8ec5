"""NMS, IoU and YOLOv8 output decoding on hand-made arrays (no model, no server)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from inference_workers.detections import Detections
from inference_workers.nms import box_iou, decode_yolov8, nms, xywh2xyxy


def test_box_iou_hand_computed() -> None:
    a = np.array([[0, 0, 10, 10]], float)
    b = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30], [0, 0, 0, 0]], float)
    np.testing.assert_allclose(box_iou(a, b)[0], [1.0, 50 / 150, 0.0, 0.0])


def test_xywh2xyxy() -> None:
    np.testing.assert_allclose(xywh2xyxy(np.array([[10, 20, 4, 6]], float)), [[8, 17, 12, 23]])


def test_nms_suppresses_overlaps_keeps_order() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 30, 30], [0, 0, 10, 9]], np.float32)
    scores = np.array([0.9, 0.8, 0.7, 0.95], np.float32)
    # box 3 (0.95) overlaps 0 with IoU .9 and 1 with IoU ~.75: both go; box 2 is alone
    assert nms(boxes, scores, 0.5).tolist() == [3, 2]
    # at a high IoU threshold only the near-duplicate (IoU .9 > .85) is removed
    assert nms(boxes, scores, 0.85).tolist() == [3, 1, 2]


def test_nms_is_per_class() -> None:
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    scores = np.array([0.9, 0.8, 0.7], np.float32)
    assert nms(boxes, scores, 0.5, class_ids=np.array([0, 1, 0])).tolist() == [0, 1]
    assert nms(boxes, scores, 0.5).tolist() == [0]


def test_nms_max_det_and_empty() -> None:
    boxes = np.array([[i * 20, 0, i * 20 + 10, 10] for i in range(5)], np.float32)
    assert nms(boxes, np.linspace(0.9, 0.5, 5), 0.5, max_det=3).tolist() == [0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).size == 0


def test_decode_yolov8_thresholds_per_class() -> None:
    # 2 classes, 4 anchors: [cx, cy, w, h, s0, s1]
    anchors = np.array([
        [10, 10, 4, 4, 0.9, 0.1],   # class 0 @ .9
        [10, 10, 4, 4, 0.2, 0.6],   # class 1 @ .6, same place, other class: kept
        [11, 10, 4, 4, 0.85, 0.0],  # class 0 duplicate of the first: suppressed
        [50, 50, 8, 8, 0.0, 0.35],  # class 1 @ .35: below class 1's threshold .4
    ], np.float32)
    out = Detections(*decode_yolov8(anchors.T, np.array([0.25, 0.4]), iou_threshold=0.45))
    assert out.class_id.tolist() == [0, 1]
    np.testing.assert_allclose(out.confidence, [0.9, 0.6], rtol=1e-6)
    np.testing.assert_allclose(out.xyxy, [[8, 8, 12, 12], [8, 8, 12, 12]])


def test_decode_yolov8_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError):
        decode_yolov8(np.zeros((6, 3), np.float32), np.array([0.25]), 0.45)
    empty = Detections(*decode_yolov8(np.zeros((6, 3), np.float32), np.array([0.25, 0.25]), 0.45))
    assert empty.xyxy.shape == (0, 4)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 90), st.floats(0, 90), st.floats(1, 30), st.floats(1, 30),
                          st.floats(0.01, 1), st.integers(0, 2)), min_size=1, max_size=30),
       st.floats(0.1, 0.9))
def test_nms_invariants(raw: list[tuple[float, float, float, float, float, int]], thr: float) -> None:
    """Kept boxes of one class never overlap above the threshold; every dropped box overlaps a better kept one."""
    arr = np.array(raw, np.float64)
    boxes = np.c_[arr[:, 0], arr[:, 1], arr[:, 0] + arr[:, 2], arr[:, 1] + arr[:, 3]].astype(np.float32)
    scores, cls = arr[:, 4].astype(np.float32), arr[:, 5].astype(np.int64)
    keep = nms(boxes, scores, thr, class_ids=cls)
    iou = box_iou(boxes, boxes)
    kept = set(keep.tolist())
    for i in keep:
        for j in keep:
            if i != j and cls[i] == cls[j]:
                assert iou[i, j] <= thr + 1e-5
    for d in set(range(len(boxes))) - kept:
        assert any(cls[k] == cls[d] and scores[k] >= scores[d] and iou[k, d] > thr - 1e-5 for k in kept)
