"""The one columnar detections type: adapters, row access, masks (RLE) and serialisation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from inference_workers.detections import Detection, Detections, rle_decode, rle_encode
from inference_workers.detector import LetterboxMeta, Thresholds
from inference_workers.verdict import FAIL, PASS, ImageStats, Timings, build_inspection, decide
from schemas.serde import deserialize, serialize

NAMES = ("scratch", "dent")


def _yolo_output(rows: list[tuple[float, float, float, float, int, float]], nc: int = 2, n: int = 8) -> np.ndarray:
    """A [4+nc, n] YOLOv8 output with the given (cx, cy, w, h, class, score) anchors, the rest empty."""
    out = np.zeros((4 + nc, n), np.float32)
    for i, (cx, cy, w, h, c, s) in enumerate(rows):
        out[:4, i] = (cx, cy, w, h)
        out[4 + c, i] = s
    return out


def test_from_onnx_output_thresholds_nms_and_maps_back_through_the_letterbox() -> None:
    pred = _yolo_output([(20, 20, 10, 10, 0, 0.9), (20, 20, 10, 10, 0, 0.8), (40, 40, 4, 4, 1, 0.3)])
    # a 200x100 image letterboxed into 64x64: gain .32, padded 16 px top
    meta = LetterboxMeta(gain_x=0.32, gain_y=0.32, pad_x=0.0, pad_y=16.0, height=100, width=200)
    d = Detections.from_onnx_output(pred, np.array([0.25, 0.5]), 0.45, class_names=NAMES, letterbox=meta)
    assert len(d) == 1  # the duplicate is suppressed, the dent is below its class threshold
    np.testing.assert_allclose(d.xyxy[0], [15 / 0.32, 0.0, 25 / 0.32, 9 / 0.32])
    row = d[0]
    assert isinstance(row, Detection) and row.class_name == "scratch" and row.score == pytest.approx(0.9)
    assert [r.class_name for r in d] == ["scratch"]


def test_from_ultralytics_duck_types_the_result() -> None:
    boxes = SimpleNamespace(xyxy=np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32), conf=np.array([0.5, 0.7]),
                            cls=np.array([1.0, 0.0]))
    mask = np.zeros((2, 4, 4), np.float32)
    mask[0, 1:3, 1:3] = 1
    res = SimpleNamespace(boxes=boxes, names={0: "scratch", 1: "dent"}, masks=SimpleNamespace(data=mask))
    d = Detections.from_ultralytics(res)
    assert [r.class_name for r in d] == ["dent", "scratch"]
    assert d.class_id.dtype == np.int64 and d.xyxy.shape == (2, 4)
    assert d.masks is not None and d.masks[0]["area"] == 4 and d.masks[1]["area"] == 0
    assert rle_decode(d.masks[0]).sum() == 4


def test_selection_merge_and_thresholds() -> None:
    a = Detections([[0, 0, 1, 1], [0, 0, 2, 2]], [0.9, 0.3], [0, 1], NAMES, data={"image": ["x", "x"]})
    b = Detections([[1, 1, 3, 3]], [0.6], [1], NAMES, data={"image": ["y"]})
    m = Detections.merge([a, b])
    assert len(m) == 3 and m.data["image"].tolist() == ["x", "x", "y"]
    assert m[m.class_id == 1].confidence.tolist() == pytest.approx([0.3, 0.6])
    assert m.above({0: 0.95, 1: 0.5}).tolist() == [False, False, True]
    assert m.max_confidence == pytest.approx(0.9) and Detections.empty().max_confidence == 0.0
    with pytest.raises(ValueError, match="masks"):
        Detections([[0, 0, 1, 1]], [0.5], [0], NAMES, masks=[])
    t = Thresholds(default_score=0.5, per_class={"dent": 0.7})
    assert decide(a, t) == FAIL and decide(b, t) == PASS and decide(Detections.empty(NAMES), t) == PASS


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 12), st.integers(1, 12))))
def test_rle_round_trip(mask: np.ndarray) -> None:
    rle = rle_encode(mask)
    assert sum(rle["counts"]) == mask.size and rle["area"] == int(mask.sum())
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_inspection_serialises_detections_with_masks_and_image_stats() -> None:
    m = np.zeros((4, 6), bool)
    m[1:3, 2:5] = True
    d = Detections([[2, 1, 5, 3]], [0.8], [0], NAMES).with_masks([rle_encode(m)])
    ref = {"frame_id": "00000000-0000-4000-8000-000000000001", "line_id": "l", "camera_id": "c", "seq": 1,
           "captured_at": 1, "uri": "file:///x.jpg"}
    rec = build_inspection(ref, detections=d, thresholds=Thresholds(), model_name="m", model_version="1",
                           timings=Timings(1, 1, 1, 1, 1, 5), inspected_at_us=2, batch_size=1, worker_id="w",
                           source_partition=0, source_offset=0, width=6, height=4,
                           image_stats=ImageStats(100.0, 12.5, 3.25, 0.8))
    back = deserialize("inspection", *serialize("inspection", rec))
    assert back["verdict"] == FAIL
    det = back["detections"][0]
    assert det["mask"]["area"] == 6 and det["class_name"] == "scratch"
    np.testing.assert_array_equal(rle_decode(det["mask"]), m)
    assert back["image_stats"] == pytest.approx({"brightness": 100.0, "contrast": 12.5, "sharpness": 3.25,
                                                 "max_score": 0.8})
