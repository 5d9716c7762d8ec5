"""Calibrated operating points on hand-made score sets (thresholds checked against hand computation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from training.calibrate import choose_image_threshold, class_thresholds, operating_curve
from training.errors import TrainingError
from training.evaluate import GroundTruth, predictions

# 20 defect-free images (top scores) and 5 defective ones
NEG = [0.9, 0.6, 0.5, 0.4, 0.35, 0.3, 0.2, 0.2, 0.1, 0.1] + [0.05] * 5 + [0.0] * 5
POS = [0.95, 0.7, 0.55, 0.45, 0.3]
SCORES = NEG + POS
DEFECTIVE = [False] * len(NEG) + [True] * len(POS)


class Prediction(NamedTuple):
    """A hand-made detection row: (image, class_id, score, box), as training.evaluate.predictions takes."""

    image: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]


def test_max_fpr_budget_met_as_computed_by_hand() -> None:
    # 5 % of 20 defect-free images = 1 false reject allowed: 0.9 only -> threshold 0.7 (0.6 would add a 2nd)
    p = choose_image_threshold(SCORES, DEFECTIVE, max_fpr=0.05)
    assert (p.threshold, p.false_rejects, p.frr, p.recall, p.misses) == (0.7, 1, 0.05, 0.4, 3)
    # 10 %: 2 allowed (0.9, 0.6) -> the lowest such threshold is 0.55 (0.5 would make 3)
    p = choose_image_threshold(SCORES, DEFECTIVE, max_fpr=0.10)
    assert (p.threshold, p.false_rejects, p.frr, p.recall) == (0.55, 2, 0.1, 0.6)
    # 0 %: no defect-free image may FAIL -> 0.95 (> 0.9)
    p = choose_image_threshold(SCORES, DEFECTIVE, max_fpr=0.0)
    assert (p.threshold, p.false_rejects, p.recall) == (0.95, 0, 0.2)
    # recall saturates before the budget is spent: the higher threshold, no false reject bought for nothing
    p = choose_image_threshold(NEG + [0.99] * 5, DEFECTIVE, max_fpr=0.10)
    assert (p.threshold, p.recall, p.false_rejects) == (0.99, 1.0, 0)


def test_target_recall_takes_the_fewest_false_rejects() -> None:
    # recall 0.8 needs the 4 best defective images (>= 0.45): false rejects 0.9, 0.6, 0.5 -> 3/20
    p = choose_image_threshold(SCORES, DEFECTIVE, target_recall=0.8)
    assert (p.threshold, p.recall, p.false_rejects, p.frr) == (0.45, 0.8, 3, 0.15)
    # a tie between a defective and a defect-free score (0.3) counts both
    p = choose_image_threshold(SCORES, DEFECTIVE, target_recall=1.0)
    assert (p.threshold, p.recall, p.false_rejects) == (0.3, 1.0, 6)


def test_false_reject_upper_bound() -> None:
    from training.calibrate import binomial_upper

    assert binomial_upper(0, 20) == pytest.approx(1 - 0.05 ** (1 / 20), abs=1e-9)  # closed form for k = 0
    assert binomial_upper(0, 100) == pytest.approx(0.0295, abs=1e-3)  # the "rule of three": ~3/n
    assert binomial_upper(1, 20) == pytest.approx(0.2161, abs=1e-3)
    assert binomial_upper(3, 3) == 1.0 and binomial_upper(0, 0) is None
    p = choose_image_threshold(SCORES, DEFECTIVE, max_fpr=0.05)
    assert p.frr_upper95 == pytest.approx(binomial_upper(1, 20))


def test_curve_is_monotone_and_errors_are_clear() -> None:
    curve = operating_curve(SCORES, DEFECTIVE)
    assert curve[0].recall == 0.0 and curve[0].frr == 0.0 and curve[-1].recall == 1.0
    assert all(a.threshold > b.threshold and a.frr <= b.frr for a, b in zip(curve, curve[1:], strict=False))
    with pytest.raises(TrainingError, match="no defect-free images"):
        choose_image_threshold(POS, [True] * 5, max_fpr=0.05)
    with pytest.raises(TrainingError, match="exactly one"):
        choose_image_threshold(SCORES, DEFECTIVE)


def test_class_thresholds_best_f1_capped_at_the_image_threshold() -> None:
    gts = [GroundTruth(f"i{k}", 0, (0, 0, 10, 10)) for k in range(3)]
    preds = [Prediction("i0", 0, 0.9, (0, 0, 10, 10)), Prediction("x", 0, 0.8, (0, 0, 10, 10)),
             Prediction("i1", 0, 0.6, (0, 0, 10, 10)), Prediction("y", 0, 0.4, (0, 0, 10, 10))]
    # F1 by threshold: 0.9 -> 2/4, 0.8 -> 2/5, 0.6 -> 4/6 (best), 0.4 -> 4/7
    t = class_thresholds(predictions(preds), gts, ["a", "b"])
    assert t["a"]["threshold"] == pytest.approx(0.6) and t["a"]["f1"] == pytest.approx(4 / 6)
    assert t["b"]["threshold"] == 0.25 and t["b"]["f1"] is None
    capped = class_thresholds(predictions(preds), gts, ["a", "b"], cap=0.5)
    assert capped["a"]["threshold"] == 0.5 and capped["a"]["capped_at_image_threshold"]
    assert capped["b"]["threshold"] == 0.5


def test_stored_thresholds_are_served_by_default(tmp_path: Path) -> None:
    """A sidecar model.thresholds.json next to an .onnx file is what load_detector serves without flags."""
    from inference_workers.detector import Detection, Thresholds
    from inference_workers.model_loader import sidecar_path, sidecar_thresholds
    from inference_workers.verdict import decide

    model = tmp_path / "model.onnx"
    t = Thresholds(default_score=0.3, per_class={"scratch": 0.2}, image_score=0.3, source="x")
    sidecar_path(model).write_text(json.dumps(t.to_dict()))
    got = sidecar_thresholds(model)
    assert got is not None and got.image_score == 0.3 and got.per_class == {"scratch": 0.2}
    assert got.source == f"calibrated:file:{tmp_path / 'model.thresholds.json'}"
    # a reported box below the image threshold does not FAIL the frame; one at it does
    assert decide([Detection(0, "scratch", 0.25, 0, 0, 1, 1)], got) == "PASS"
    assert decide([Detection(0, "scratch", 0.3, 0, 0, 1, 1)], got) == "FAIL"
