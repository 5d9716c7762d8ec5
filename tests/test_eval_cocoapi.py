"""sqis eval's box mAP equals pycocotools' COCOeval on a fixture (same 101-point interpolation and matching)."""

from __future__ import annotations

import contextlib
import io
from typing import NamedTuple

import numpy as np
import pytest

from training.evaluate import GroundTruth, detection_metrics, predictions

pytest.importorskip("pycocotools")


class Prediction(NamedTuple):
    """A hand-made detection row: (image, class_id, score, box), as training.evaluate.predictions takes."""

    image: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]


def _fixture(seed: int = 3) -> tuple[list[GroundTruth], list[Prediction]]:
    """20 images, 3 classes; detections are jittered GT (some good, some poor), misses and false positives."""
    rng = np.random.default_rng(seed)
    gts, preds = [], []
    for i in range(20):
        img = f"img{i}"
        for _ in range(rng.integers(0, 4)):
            x, y = rng.uniform(0, 400, 2)
            w, h = rng.uniform(20, 120, 2)
            c = int(rng.integers(0, 3))
            gts.append(GroundTruth(img, c, (x, y, x + w, y + h)))
            if rng.random() < 0.85:  # found, with a jitter that spans the IoU thresholds
                j = np.clip(rng.normal(0, rng.choice([2, 6, 12]), 4), -9, 9)  # boxes stay valid (w, h >= 2)
                preds.append(Prediction(img, c, 0.0, (x + j[0], y + j[1], x + w + j[2], y + h + j[3])))
        for _ in range(rng.integers(0, 3)):  # false positives
            x, y = rng.uniform(0, 400, 2)
            preds.append(Prediction(img, int(rng.integers(0, 3)), 0.0, (x, y, x + 50, y + 40)))
    scores = rng.permutation(len(preds)) / len(preds) + 0.01  # distinct scores: no tie-order ambiguity
    preds = [Prediction(p.image, p.class_id, float(s), p.box) for p, s in zip(preds, scores, strict=True)]
    return gts, preds


def test_map_equals_pycocotools() -> None:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    gts, preds = _fixture()
    images = sorted({g.image for g in gts} | {p.image for p in preds})
    img_id = {k: i + 1 for i, k in enumerate(images)}
    xywh = lambda b: [b[0], b[1], b[2] - b[0], b[3] - b[1]]  # noqa: E731
    gt_doc = {
        "images": [{"id": img_id[k], "width": 600, "height": 600} for k in images],
        "categories": [{"id": c + 1, "name": str(c)} for c in range(3)],
        "annotations": [{"id": n + 1, "image_id": img_id[g.image], "category_id": g.class_id + 1,
                         "bbox": xywh(g.box), "area": (g.box[2] - g.box[0]) * (g.box[3] - g.box[1]), "iscrowd": 0}
                        for n, g in enumerate(gts)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco = COCO()
        coco.dataset = gt_doc
        coco.createIndex()
        dets = coco.loadRes([{"image_id": img_id[p.image], "category_id": p.class_id + 1, "bbox": xywh(p.box),
                              "score": p.score} for p in preds])
        ev = COCOeval(coco, dets, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    ours = detection_metrics(predictions(preds), gts, ["0", "1", "2"])
    assert ours["classes_present"] == 3
    assert ours["map50_95"] == pytest.approx(ev.stats[0], abs=1e-9)
    assert ours["map50"] == pytest.approx(ev.stats[1], abs=1e-9)
