"""Evaluation metrics on hand-computed cases (no model)."""

from __future__ import annotations

import math

import pytest

from inference_workers.detections import Detections
from training.evaluate import (
    GroundTruth,
    average_precision,
    detection_metrics,
    image_level_metrics,
    predictions,
)

BOX = (0.0, 0.0, 10.0, 10.0)


def _case() -> tuple[Detections, list[GroundTruth]]:
    gts = [GroundTruth("a", 0, BOX), GroundTruth("b", 0, BOX), GroundTruth("a", 1, BOX)]
    preds = predictions([
        ("a", 0, 0.9, BOX),                       # TP
        ("b", 0, 0.8, (50.0, 50.0, 60.0, 60.0)),  # FP
        ("b", 0, 0.7, BOX),                       # TP
        ("a", 1, 0.6, (1.0, 0.0, 11.0, 10.0)),    # IoU 90/110 = .818: TP up to IoU .80
        ("b", 2, 0.95, BOX),                      # class 2 has no GT: not in the mean
    ])
    return preds, gts


def test_ap_hand_computed() -> None:
    preds, gts = _case()
    c0p = preds[preds.class_id == 0]
    c0g = [g for g in gts if g.class_id == 0]
    # TP, FP, TP: precision 1, .5, .667 at recall .5, .5, 1 -> envelope 1 for r <= .5, 2/3 above.
    expected = (51 * 1.0 + 50 * (2 / 3)) / 101
    assert average_precision(c0p, c0g, 0.5) == pytest.approx(expected)
    assert average_precision(c0p, c0g, 0.95) == pytest.approx(expected)
    assert average_precision(predictions([]), c0g, 0.5) == 0.0
    assert math.isnan(average_precision(c0p, [], 0.5))


def test_map_over_classes_present() -> None:
    preds, gts = _case()
    m = detection_metrics(preds, gts, ["scratch", "patch", "pit"], operating=0.65)
    ap0 = (51 + 50 * 2 / 3) / 101
    assert m["classes_present"] == 2
    assert m["per_class"]["scratch"]["ap50"] == pytest.approx(ap0)
    assert m["per_class"]["patch"]["ap50"] == pytest.approx(1.0)
    assert m["per_class"]["patch"]["ap50_95"] == pytest.approx(0.7)  # TP at .50 ... .80: 7 of 10
    assert m["per_class"]["pit"]["ap50"] is None
    assert m["map50"] == pytest.approx((ap0 + 1.0) / 2)
    assert m["map50_95"] == pytest.approx((ap0 + 0.7) / 2)
    # operating threshold .65: kept = .9 TP, .8 FP, .7 TP (scratch), .95 FP (pit); .6 (patch) dropped
    assert m["precision"] == pytest.approx(2 / 4)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["per_class"]["patch"]["recall"] == 0.0


def test_duplicate_detection_is_a_false_positive() -> None:
    gts = [GroundTruth("a", 0, BOX)]
    preds = predictions([("a", 0, 0.9, BOX), ("a", 0, 0.8, BOX)])
    # TP then FP: precision 1, .5 at recall 1, 1 -> envelope 1 everywhere
    assert average_precision(preds, gts, 0.5) == pytest.approx(1.0)
    preds = predictions([("a", 0, 0.9, (20.0, 20.0, 30.0, 30.0)), ("a", 0, 0.8, BOX)])
    # FP then TP: precision .5 at recall 1 -> .5
    assert average_precision(preds, gts, 0.5) == pytest.approx(0.5)


def test_image_level_recall_at_fixed_fpr() -> None:
    # 20 defect-free images scored .00 .. .19 (.19 highest), 4 defective images
    neg = [i / 100 for i in range(20)]
    pos = [0.5, 0.185, 0.17, 0.05]
    r = image_level_metrics(neg + pos, [False] * 20 + [True] * 4, target_fpr=0.05,
                            operating_flags=[s >= 0.18 for s in neg + pos])
    # 1 false positive allowed (5% of 20): threshold = 2nd highest negative (.18), flagged when > .18
    assert r["threshold"] == pytest.approx(0.18)
    assert r["fpr"] == pytest.approx(1 / 20)
    assert r["recall"] == pytest.approx(2 / 4)
    assert r["at_operating"] == {"recall": pytest.approx(2 / 4), "fpr": pytest.approx(2 / 20)}


def test_image_level_without_defect_free_images() -> None:
    r = image_level_metrics([0.9, 0.1], [True, True])
    assert r["recall"] is None and r["threshold"] is None
    assert "no defect-free images" in r["reason"]


def test_ground_truth_found_by_the_ultralytics_label_rule(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from training.evaluate import load_ground_truth

    img = tmp_path / "images" / "val" / "images" / "a.png"  # the *last* images/ becomes labels/
    lbl = tmp_path / "images" / "val" / "labels" / "a.txt"
    lbl.parent.mkdir(parents=True)
    lbl.write_text("1 0.5 0.5 0.2 0.4\n0 0.1 0.1 0.2 0.1 0.3 0.3\n")  # a box, then a segment (ignored)
    (gt,) = load_ground_truth([img], {str(img): (100, 50)})
    assert gt == GroundTruth(str(img), 1, (40.0, 15.0, 60.0, 35.0))
