"""Mask metrics for `sqis eval --segmenter ...`: COCO mask mAP (pycocotools' segm evaluation), mean
mask IoU and Dice per ground-truth defect, and pixel-level AUROC where ground-truth masks exist.

Also coco_map(): pycocotools' figure for boxes or masks, used to check training/evaluate.py's own mAP.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GtInstance", "MaskEvaluator", "PredInstance", "coco_map", "gt_instances", "mask_quality", "pixel_auroc"]


@dataclass(frozen=True)
class GtInstance:
    image: str
    class_id: int
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None  # HxW bool
    rle: dict[str, Any] | None = None  # pycocotools compressed RLE (instead of mask, to save memory)


@dataclass(frozen=True)
class PredInstance:
    image: str
    class_id: int
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = None
    rle: dict[str, Any] | None = None


def _rle(mask: np.ndarray) -> dict[str, Any]:
    from pycocotools import mask as mask_utils

    r = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return r


def coco_map(gts: Sequence[GtInstance], preds: Sequence[PredInstance], class_ids: Sequence[int],
             sizes: Mapping[str, tuple[int, int]], iou_type: str = "bbox") -> dict[str, float | None]:
    """mAP@0.5 and mAP@0.5:0.95 by pycocotools (iou_type 'bbox' or 'segm'; area 'all', maxDets 100);
    sizes: image -> (width, height). None when no ground truth."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if not gts:
        return {"map50": None, "map50_95": None}
    img_ids = {k: i + 1 for i, k in enumerate(sorted(sizes))}
    images = [{"id": img_ids[k], "width": int(w), "height": int(h)} for k, (w, h) in sizes.items()]
    anns = []
    for i, g in enumerate(gts):
        x1, y1, x2, y2 = g.box
        ann: dict[str, Any] = {"id": i + 1, "image_id": img_ids[g.image], "category_id": int(g.class_id) + 1,
                               "bbox": [x1, y1, x2 - x1, y2 - y1], "iscrowd": 0}
        if iou_type == "segm":
            from pycocotools import mask as mask_utils

            ann["segmentation"] = g.rle if g.rle is not None else _rle(g.mask)  # type: ignore[arg-type]
            ann["area"] = float(mask_utils.area(ann["segmentation"]))
        else:
            ann["area"] = float((x2 - x1) * (y2 - y1))
        anns.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": anns,
                    "categories": [{"id": int(c) + 1, "name": str(c)} for c in class_ids]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        dets = []
        for p in preds:
            x1, y1, x2, y2 = p.box
            d: dict[str, Any] = {"image_id": img_ids[p.image], "category_id": int(p.class_id) + 1,
                                 "score": float(p.score), "bbox": [x1, y1, x2 - x1, y2 - y1]}
            if iou_type == "segm":
                d["segmentation"] = p.rle if p.rle is not None else _rle(p.mask)  # type: ignore[arg-type]
            dets.append(d)
        if not dets:
            return {"map50": 0.0, "map50_95": 0.0}
        cdt = coco.loadRes(dets)
        ev = COCOeval(coco, cdt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return {"map50": float(ev.stats[1]), "map50_95": float(ev.stats[0])}


def gt_instances(mask_png: Path, image: str, boxes: Sequence[tuple[int, tuple[float, float, float, float]]],
                 min_area: int = 10) -> list[GtInstance]:
    """Ground-truth instances of one image: connected components (>= min_area px) of its mask PNG
    (defect where > 0); each takes the class of the labelled box it overlaps most (else class 0)."""
    import cv2

    from inference_workers.nms import box_iou

    m = cv2.imread(str(mask_png), cv2.IMREAD_GRAYSCALE)
    if m is None:
        return []
    n, lab, stats, _ = cv2.connectedComponentsWithStats((m > 0).astype(np.uint8), connectivity=8)
    out = []
    for k in range(1, n):
        x, y, w, h, area = (int(v) for v in stats[k])
        if area < min_area:
            continue
        box = (float(x), float(y), float(x + w), float(y + h))
        cls = 0
        if boxes:
            ious = box_iou(np.array([box]), np.array([b for _, b in boxes]))[0]
            cls = int(boxes[int(np.argmax(ious))][0])
        out.append(GtInstance(image, cls, box, lab == k))
    return out


def mask_quality(gts: Sequence[GtInstance], preds: Sequence[PredInstance], operating: Mapping[int, float]) -> dict[str, Any]:
    """Per ground-truth defect, the best-overlapping predicted mask of the same class at the operating
    threshold: mean IoU and Dice over all defects (0 when missed) and over detected ones (mask IoU >= 0.5
    counts as detected)."""
    from inference_workers.segment import mask_iou

    by_img: dict[str, list[PredInstance]] = {}
    for p in preds:
        if p.mask is not None and p.score >= operating.get(p.class_id, 0.25):
            by_img.setdefault(p.image, []).append(p)
    ious, dices = [], []
    for g in gts:
        assert g.mask is not None
        best = 0.0
        for p in by_img.get(g.image, []):
            if p.class_id == g.class_id and p.mask is not None:
                best = max(best, mask_iou(g.mask, p.mask))
        ious.append(best)
        dices.append(2 * best / (1 + best) if best > 0 else 0.0)
    iou_a, dice_a = np.array(ious), np.array(dices)
    det = iou_a >= 0.5
    return {
        "_ious": ious,
        "defects": len(gts),
        "detected_defects": int(det.sum()),
        "mean_mask_iou": float(iou_a.mean()) if len(iou_a) else None,
        "mean_dice": float(dice_a.mean()) if len(dice_a) else None,
        "mean_mask_iou_detected": float(iou_a[det].mean()) if det.any() else None,
        "mean_dice_detected": float(dice_a[det].mean()) if det.any() else None,
    }


def pixel_auroc(score_maps: Sequence[np.ndarray], gt_maps: Sequence[np.ndarray], bins: int = 1000) -> float | None:
    """Pixel-level AUROC of per-pixel defect scores (e.g. max detection score over the masks covering the
    pixel) against ground-truth masks, over all pixels of all images; scores quantised to `bins` levels
    in [0, 1] (ties count half). None when the pixels are all defect or all defect-free."""
    pos = np.zeros(bins + 1, np.int64)
    neg = np.zeros(bins + 1, np.int64)
    for s, g in zip(score_maps, gt_maps, strict=True):
        q = np.clip(np.round(np.asarray(s, np.float64) * bins), 0, bins).astype(np.int64)
        gb = np.asarray(g, bool)
        pos += np.bincount(q[gb], minlength=bins + 1)
        neg += np.bincount(q[~gb], minlength=bins + 1)
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return None
    neg_below = np.concatenate(([0], np.cumsum(neg)[:-1]))  # negatives scoring strictly lower
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


class MaskEvaluator:
    """Accumulates mask metrics image by image (full masks are not kept: RLE for COCO, a 4x-downsampled
    score map for pixel AUROC)."""

    def __init__(self, class_ids: Sequence[int], operating: Mapping[int, float], max_dets: int = 100,
                 pixel_stride: int = 4, bins: int = 1000) -> None:
        self.class_ids = list(class_ids)
        self.operating = dict(operating)
        self.max_dets = max_dets
        self.stride = pixel_stride
        self.bins = bins
        self.gts: list[GtInstance] = []
        self.preds: list[PredInstance] = []
        self.sizes: dict[str, tuple[int, int]] = {}
        self.ious: list[float] = []
        self.pos = np.zeros(bins + 1, np.int64)
        self.neg = np.zeros(bins + 1, np.int64)
        self.has_gt_masks = False

    def add(self, image: str, size: tuple[int, int], gts: Sequence[GtInstance], preds: Sequence[PredInstance],
            gt_map: np.ndarray | None) -> None:
        """One image: its GT instances (with masks), predictions (with masks; best first) and the GT
        defect map (None when the dataset has no mask for it)."""
        w, h = size
        self.sizes[image] = size
        self.gts += [GtInstance(g.image, g.class_id, g.box, None, _rle(g.mask)) for g in gts if g.mask is not None]
        kept = list(preds)[: self.max_dets]
        self.preds += [PredInstance(p.image, p.class_id, p.score, p.box, None, _rle(p.mask))
                       for p in kept if p.mask is not None]
        q = mask_quality(gts, kept, self.operating)
        self.ious += q["_ious"]
        if gt_map is not None:
            self.has_gt_masks = True
            score = np.zeros((h, w), np.float32)
            for p in kept:
                if p.mask is not None:
                    np.maximum(score, np.where(p.mask, np.float32(p.score), np.float32(0)), out=score)
            s, g = score[:: self.stride, :: self.stride], np.asarray(gt_map, bool)[:: self.stride, :: self.stride]
            qs = np.clip(np.round(s.astype(np.float64) * self.bins), 0, self.bins).astype(np.int64)
            self.pos += np.bincount(qs[g], minlength=self.bins + 1)
            self.neg += np.bincount(qs[~g], minlength=self.bins + 1)

    def result(self) -> dict[str, Any]:
        segm = coco_map(self.gts, self.preds, self.class_ids, self.sizes, "segm")
        iou_a = np.array(self.ious)
        dice_a = np.where(iou_a > 0, 2 * iou_a / (1 + iou_a), 0.0)
        det = iou_a >= 0.5
        n_pos, n_neg = int(self.pos.sum()), int(self.neg.sum())
        auroc = None
        if n_pos and n_neg:
            neg_below = np.concatenate(([0], np.cumsum(self.neg)[:-1]))
            auroc = float((self.pos * (neg_below + 0.5 * self.neg)).sum() / (n_pos * n_neg))
        return {
            "mask_map50": segm["map50"], "mask_map50_95": segm["map50_95"],
            "defects": len(iou_a), "detected_defects": int(det.sum()),
            "mean_mask_iou": float(iou_a.mean()) if len(iou_a) else None,
            "mean_dice": float(dice_a.mean()) if len(dice_a) else None,
            "mean_mask_iou_detected": float(iou_a[det].mean()) if det.any() else None,
            "mean_dice_detected": float(dice_a[det].mean()) if det.any() else None,
            "pixel_auroc": auroc if self.has_gt_masks else None,
            "pixel_stride": self.stride,
        }
