"""Export a YOLOv8-seg checkpoint to ONNX and check the serving path (detector + numpy mask decoding in
inference_workers/segment.py) against PyTorch (Ultralytics predict with retina masks): boxes and scores
as the detector's parity check, plus the mask IoU of every matched detection.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.export import PARITY_CONF, PARITY_TOLERANCE, ParityReport, export_onnx, match_detections
from training.offline import import_ultralytics

log = logging.getLogger(__name__)

__all__ = ["MASK_PARITY_TOLERANCE", "SegmentParityReport", "export_check_register_segment", "segment_parity_check"]

# mean mask IoU of matched detections (ONNX + numpy decode vs Ultralytics retina masks) must reach this
MASK_PARITY_TOLERANCE = {"min_mean_mask_iou": 0.85}


@dataclass
class SegmentParityReport(ParityReport):
    """ParityReport plus the mask agreement of matched detections."""

    mean_mask_iou: float = 0.0
    min_mask_iou: float = 0.0
    masks_compared: int = 0


def segment_parity_check(
    weights: Path | str, onnx_path: Path | str, images: Sequence[Path | str | np.ndarray], *,
    conf: float = PARITY_CONF, iou: float = 0.45, state_dir: Path | str = ".sqis",
) -> SegmentParityReport:
    import cv2

    from inference_workers.detector import Detector, Thresholds, make_session
    from inference_workers.segment import YoloSegSegmenter, mask_iou

    tol: dict[str, float] = {**PARITY_TOLERANCE, **MASK_PARITY_TOLERANCE}
    arrays = []
    for im in images:
        arr = cv2.imread(str(im), cv2.IMREAD_COLOR) if not isinstance(im, np.ndarray) else im
        if arr is None:
            raise FileNotFoundError(f"cannot read golden image {im}")
        arrays.append(arr)
    session = make_session(onnx_path, "cpu")
    det = Detector(session, Thresholds(default_score=conf, iou=iou), path=str(onnx_path))
    seg = YoloSegSegmenter(session, path=str(onnx_path))
    import_ultralytics(state_dir)
    from ultralytics import YOLO

    model = YOLO(str(weights))
    max_diff, min_iou, matched, unmatched, unmatched_hi = 0.0, 1.0, 0, 0, 0
    ious: list[float] = []
    margin = conf + tol["unmatched_margin"]
    for img in arrays:
        dets = det.detect([img])[0]
        ob = np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4)
        oc = np.array([d.class_id for d in dets], dtype=np.int64)
        os_ = np.array([d.score for d in dets], dtype=np.float64)
        res = model.predict(img, conf=conf, iou=iou, imgsz=list(det.imgsz), rect=False, device="cpu", verbose=False,
                            max_det=det.max_det, retina_masks=True)[0]
        tb = res.boxes.xyxy.cpu().numpy().astype(np.float64).reshape(-1, 4)
        tc = res.boxes.cls.cpu().numpy().astype(np.int64)
        ts = res.boxes.conf.cpu().numpy().astype(np.float64)
        tm = res.masks.data.cpu().numpy() > 0.5 if res.masks is not None else np.zeros((0, *img.shape[:2]), bool)
        pairs = match_detections(ob, oc, tb, tc, tol["match_iou"])
        sel = [i for i, _, _ in pairs]
        om = seg.segment(img, ob[sel], oc[sel], os_[sel]) if pairs else []
        for k, (i, j, v) in enumerate(pairs):
            max_diff = max(max_diff, abs(os_[i] - ts[j]))
            min_iou = min(min_iou, v)
            if tm[j].any() or om[k].any():
                ious.append(mask_iou(om[k], tm[j]))
        matched += len(pairs)
        mo, mt = np.ones(len(ob), bool), np.ones(len(tb), bool)
        for i, j, _ in pairs:
            mo[i] = mt[j] = False
        unmatched += int(mo.sum() + mt.sum())
        unmatched_hi += int((os_[mo] > margin).sum() + (ts[mt] > margin).sum())
    mean_iou = float(np.mean(ious)) if ious else 0.0
    within = (max_diff <= tol["max_score_diff"] and min_iou >= tol["min_box_iou"] and unmatched_hi == 0
              and (not ious or mean_iou >= tol["min_mean_mask_iou"]))
    status = "failed" if not within else "passed" if matched and ious else "unverified"
    report = SegmentParityReport(
        images=len(arrays), matched=matched, max_score_diff=round(max_diff, 6),
        min_box_iou=round(min_iou if matched else 0.0, 6), unmatched_above_margin=unmatched_hi,
        unmatched_total=unmatched, conf=conf, iou=iou, tolerance=tol, passed=status == "passed", status=status,
        mean_mask_iou=round(mean_iou, 6), min_mask_iou=round(min(ious) if ious else 0.0, 6), masks_compared=len(ious),
    )
    log.log(logging.INFO if status == "passed" else logging.WARNING, "segment parity check", extra=report.to_dict())
    return report


def export_check_register_segment(
    result: Any, data_yaml: Path, run: Any, register_name: str | None, *, conf: float,
    iou: float, export: bool, parity: bool, state: Path, card_hash: str | None, model: str,
    allow_unverified: bool = False,
) -> None:
    """Export best.pt (YOLOv8-seg) to ONNX, run the box + mask parity check on the golden images, log
    and register (never after a failed check; after an unverified one only with allow_unverified)."""
    from training.golden import golden_images, parity_blocks_registration

    if not export:
        return
    onnx_path = export_onnx(result.best_pt, result.run_dir / "model.onnx", name=register_name, state_dir=state)
    result.onnx_path = onnx_path
    if parity:
        result.parity = p = segment_parity_check(result.best_pt, onnx_path, golden_images(data_yaml), conf=conf,
                                                 iou=iou, state_dir=state)
        if run is not None:
            run.metrics({"parity/max_score_diff": p.max_score_diff, "parity/min_box_iou": p.min_box_iou,
                         "parity/unmatched_above_margin": p.unmatched_above_margin, "parity/matched": p.matched,
                         "parity/mean_mask_iou": p.mean_mask_iou, "parity/min_mask_iou": p.min_mask_iou,
                         "parity/passed": float(p.passed)}, step=0)
            run.tags({"parity_passed": p.passed, "parity_status": p.status, "parity_tolerance": json.dumps(p.tolerance),
                      "parity_golden_images": p.images})
    failed = parity_blocks_registration(result.parity, allow_unverified)
    if run is not None and (failed or not register_name):
        from training.registry import MODEL_ARTIFACT_DIR

        run.artifact(onnx_path, MODEL_ARTIFACT_DIR)
    if failed:
        assert result.parity is not None
        log.error("ONNX/PyTorch segment parity check %s: not registering", result.parity.status,
                  extra=result.parity.to_dict())
        return
    if run is not None and register_name:
        from training.export import read_metadata
        from training.registry import register_onnx

        meta = read_metadata(onnx_path)
        tags: dict[str, Any] = {"dataset_card_hash": card_hash or "", "imgsz": meta.get("imgsz", ""), "model": model,
                                "task": "segment", "classes": meta.get("names", ""),
                                **{f"metric.{k}": v for k, v in result.metrics.items()}}
        if result.parity is not None:
            tags.update(parity_status=result.parity.status, parity_max_score_diff=result.parity.max_score_diff,
                        parity_min_box_iou=result.parity.min_box_iou)
        result.model_name = register_name
        result.model_version = register_onnx(run.client, run.run, onnx_path, register_name, tags=tags)
        run.tags({"registered_model": f"{register_name}/{result.model_version}"})
