"""Evaluate a detector on a dataset split through the serving code path (inference_workers.detector).

mAP@0.5 and mAP@0.5:0.95 (COCO-style 101-point interpolation, per class, averaged over the classes
present in the split), precision/recall at the operating thresholds, image-level recall at a fixed
false-positive rate on defect-free images, and optional CPU latency. No torch needed.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.detections import Detections
from inference_workers.detector import Detector, Thresholds, make_session
from inference_workers.model_loader import load_detector
from inference_workers.nms import box_iou
from inference_workers.tiling import TiledDetector, TileSpec
from inference_workers.verdict import FAIL, decide
from training.errors import TrainingError
from training.importers.yolo import label_path

if TYPE_CHECKING:
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "IOU_THRESHOLDS", "GroundTruth", "average_precision", "detection_metrics", "evaluate", "image_level_metrics",
    "load_ground_truth", "measure_latency", "open_split", "predict_split", "predictions", "split_images",
]

IOU_THRESHOLDS = np.round(np.arange(0.5, 0.951, 0.05), 2)
RECALL_POINTS = np.linspace(0.0, 1.0, 101)
MAP_CONF = 0.001  # detector threshold for mAP, as usual: the PR curve needs low-score detections
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class GroundTruth:
    """One ground-truth box of one image (pixels)."""

    image: str
    class_id: int
    box: tuple[float, float, float, float]


def predictions(rows: Sequence[tuple[str, int, float, Sequence[float]]]) -> Detections:
    """Detections of many images from (image, class_id, score, xyxy) rows; the image in data["image"]."""
    return Detections(np.array([r[3] for r in rows], dtype=np.float64).reshape(-1, 4),
                      np.array([r[2] for r in rows], dtype=np.float32), np.array([r[1] for r in rows], dtype=np.int64),
                      data={"image": np.array([r[0] for r in rows], dtype=object)})


# ---- pure metrics ---------------------------------------------------------------------------------
def _match(preds: Detections, gts: Sequence[GroundTruth], iou_thr: float) -> np.ndarray:
    """COCO greedy matching for one class: detections by descending score each take the unmatched GT of
    their image with the highest IoU >= iou_thr. ``preds`` (with data["image"]) must be in that order.
    Returns a TP flag per prediction (in the given order)."""
    by_img: dict[str, list[int]] = {}
    for j, g in enumerate(gts):
        by_img.setdefault(g.image, []).append(j)
    gt_boxes = np.array([g.box for g in gts], dtype=np.float64).reshape(-1, 4)
    used = np.zeros(len(gts), bool)
    tp = np.zeros(len(preds), bool)
    if not len(preds):
        return tp
    images = preds.data["image"]
    for i in range(len(preds)):
        cand = by_img.get(images[i])
        if not cand:
            continue
        idx = np.array(cand)
        ious = box_iou(preds.xyxy[i:i + 1], gt_boxes[idx])[0]
        ious[used[idx]] = -1.0
        k = int(np.argmax(ious))
        if ious[k] >= iou_thr:
            used[idx[k]] = True
            tp[i] = True
    return tp


def _by_score(preds: Detections) -> Detections:
    return preds[np.argsort(-preds.confidence.astype(np.float64), kind="stable")]


def average_precision(preds: Detections, gts: Sequence[GroundTruth], iou_thr: float) -> float:
    """AP of one class at one IoU threshold, COCO 101-point interpolated (precision envelope)."""
    if not gts:
        return float("nan")
    if not len(preds):
        return 0.0
    tp = _match(_by_score(preds), gts, iou_thr)
    ctp = np.cumsum(tp)
    cfp = np.cumsum(~tp)
    recall = ctp / len(gts)
    precision = ctp / np.maximum(ctp + cfp, 1)
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    idx = np.searchsorted(recall, RECALL_POINTS, side="left")
    interp = np.where(idx < len(envelope), envelope[np.minimum(idx, len(envelope) - 1)], 0.0)
    return float(interp.mean())


def detection_metrics(
    preds: Detections, gts: Sequence[GroundTruth], class_names: Sequence[str],
    operating: Mapping[int, float] | float = 0.25,
) -> dict[str, Any]:
    """mAP@0.5, mAP@0.5:0.95 and per-class AP over classes with GT; P/R at the operating thresholds
    (a detection counts when its score >= its class threshold; TP at IoU 0.5)."""
    per_class: dict[str, dict[str, Any]] = {}
    ap50s, ap5095s = [], []
    tp_all = det_all = gt_all = 0
    for c, name in enumerate(class_names):
        cp = preds[preds.class_id == c]
        cg = [g for g in gts if g.class_id == c]
        thr = operating.get(c, 0.25) if isinstance(operating, Mapping) else float(operating)
        op = cp[cp.above(thr)]
        tp = int(_match(_by_score(op), cg, 0.5).sum()) if len(op) else 0
        entry: dict[str, Any] = {"gt": len(cg), "detections_at_threshold": len(op), "threshold": thr,
                                 "precision": tp / len(op) if len(op) else None,
                                 "recall": tp / len(cg) if cg else None}
        if cg:
            aps = [average_precision(cp, cg, t) for t in IOU_THRESHOLDS]
            entry["ap50"], entry["ap50_95"] = aps[0], float(np.mean(aps))
            ap50s.append(aps[0])
            ap5095s.append(float(np.mean(aps)))
        else:
            entry["ap50"] = entry["ap50_95"] = None
        per_class[name] = entry
        tp_all += tp
        det_all += len(op)
        gt_all += len(cg)
    return {
        "map50": float(np.mean(ap50s)) if ap50s else None,
        "map50_95": float(np.mean(ap5095s)) if ap5095s else None,
        "classes_present": len(ap50s),
        "precision": tp_all / det_all if det_all else None,
        "recall": tp_all / gt_all if gt_all else None,
        "per_class": per_class,
    }


def image_level_metrics(
    scores: Sequence[float], defective: Sequence[bool], target_fpr: float = 0.05,
    operating_flags: Sequence[bool] | None = None,
) -> dict[str, Any]:
    """Image-level recall at a threshold whose FPR on defect-free images is <= target_fpr.

    An image's score is its highest detection score; it is flagged when score > threshold.
    operating_flags: whether each image was flagged at the operating thresholds (FAIL verdict).
    """
    s = np.asarray(scores, dtype=np.float64)
    d = np.asarray(defective, dtype=bool)
    n_pos, n_neg = int(d.sum()), int((~d).sum())
    out: dict[str, Any] = {"target_fpr": target_fpr, "defective_images": n_pos, "defect_free_images": n_neg}
    if n_neg == 0:
        out.update(threshold=None, recall=None, fpr=None,
                   reason="the split has no defect-free images: image-level FPR is undefined")
    elif n_pos == 0:
        out.update(threshold=None, recall=None, fpr=None, reason="the split has no defective images")
    else:
        neg = np.sort(s[~d])[::-1]
        k = int(np.floor(target_fpr * n_neg + 1e-9))  # false positives allowed
        thr = float(neg[k]) if k < n_neg else float("-inf")  # strict '>': at most k negatives exceed
        out.update(threshold=thr if np.isfinite(thr) else 0.0, recall=float((s[d] > thr).mean()),
                   fpr=float((s[~d] > thr).mean()), reason=None)
    if operating_flags is not None:
        f = np.asarray(operating_flags, dtype=bool)
        out["at_operating"] = {
            "recall": float(f[d].mean()) if n_pos else None,
            "fpr": float(f[~d].mean()) if n_neg else None,
        }
    return out


# ---- data -----------------------------------------------------------------------------------------
def split_images(data_dir: Path, split: str) -> list[Path]:
    from training.train import find_val_images, resolve_data_yaml

    if (data_dir / "data.yaml").is_file() or data_dir.suffix in (".yaml", ".yml"):
        imgs = find_val_images(resolve_data_yaml(data_dir), split)
        if imgs:
            return imgs
    d = data_dir / "images" / split
    return sorted(p for p in d.rglob("*") if p.suffix.lower() in IMAGE_EXTS) if d.is_dir() else []


def load_ground_truth(images: Sequence[Path], sizes: Mapping[str, tuple[int, int]]) -> list[GroundTruth]:
    """YOLO labels (class cx cy w h, normalised) of the images as pixel boxes; sizes: key -> (w, h)."""
    gts = []
    for img in images:
        lp = label_path(img)
        if not lp.is_file():
            continue
        w, h = sizes[str(img)]
        for line in lp.read_text().splitlines():
            v = line.split()
            if len(v) != 5:
                continue  # segment lines are not boxes
            c, cx, cy, bw, bh = int(v[0]), *map(float, v[1:])
            gts.append(GroundTruth(str(img), c, ((cx - bw / 2) * w, (cy - bh / 2) * h,
                                                 (cx + bw / 2) * w, (cy + bh / 2) * h)))
    return gts


# ---- latency --------------------------------------------------------------------------------------
def measure_latency(det: Detector | TiledDetector, image: np.ndarray, batch_sizes: Sequence[int] = (1, 8),
                    runs: int = 20, threads: int = 0) -> dict[str, float]:
    """Median end-to-end detect() time per image on a CPU session (ms), per batch size (tiled when det is)."""
    cpu: Detector | TiledDetector = Detector(make_session(det.path or "", "cpu", threads), det.thresholds,
                                             name=det.name, version=det.version, path=det.path)
    if isinstance(det, TiledDetector):
        cpu = TiledDetector(cpu, det.spec)  # type: ignore[arg-type]
    out = {}
    for b in batch_sizes:
        imgs = [image] * b
        cpu.detect(imgs)  # warm-up
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            cpu.detect(imgs)
            times.append((time.perf_counter() - t0) * 1000 / b)
        out[f"batch{b}"] = round(statistics.median(times), 3)
    return out


def _check_classes(data: Path, names: Sequence[str]) -> None:
    """The dataset's class list must be the model's, in order, or every metric is meaningless."""
    import yaml

    y = data / "data.yaml" if data.is_dir() else data
    if not y.is_file():
        return
    cfg = yaml.safe_load(y.read_text()) or {}
    dn = cfg.get("names")
    data_names = [str(dn[k]) for k in sorted(dn)] if isinstance(dn, dict) else [str(n) for n in dn or []]
    if data_names and data_names != list(names):
        raise TrainingError(f"the model's classes {list(names)} are not the dataset's {data_names}")


# ---- masks ----------------------------------------------------------------------------------------
def _mask_setup(segmenter: str, sam_model: str | None, settings: Settings, det: Detector, names: Sequence[str],
                op_thr: Mapping[int, float]) -> tuple[Any, Any]:
    if segmenter == "none":
        return None, None
    from inference_workers.detector import DetectorError
    from inference_workers.segment import SamSegmenter, YoloSegSegmenter
    from training.mask_metrics import MaskEvaluator

    seg: Any
    if segmenter == "yolo-seg":
        try:
            seg = YoloSegSegmenter(det.session, path=det.path)
        except DetectorError as exc:
            raise TrainingError(f"--segmenter yolo-seg: {exc}") from None
    elif segmenter == "sam":
        if not sam_model:
            raise TrainingError("--segmenter sam needs --sam-model DIR (from `sqis sam export`)")
        seg = SamSegmenter.from_dir(sam_model, settings.onnx_providers, settings.onnx_threads)
    else:
        raise TrainingError(f"--segmenter {segmenter!r}: expected none, yolo-seg or sam")
    return seg, MaskEvaluator(range(len(names)), op_thr)


def _add_masks(seg: Any, ev: Any, data: Path, split: str, img_path: Path, img: np.ndarray,
               dets: Detections) -> None:
    from inference_workers.segment import YoloSegSegmenter
    from training.mask_metrics import PredInstance, gt_instances

    h, w = img.shape[:2]
    root = data if data.is_dir() else data.parent
    mask_png = root / "masks" / split / f"{img_path.stem}.png"
    lp = label_path(img_path)
    boxes = []
    if lp.is_file():
        for line in lp.read_text().splitlines():
            v = line.split()
            if len(v) == 5:
                c, cx, cy, bw, bh = int(v[0]), *map(float, v[1:])
                boxes.append((c, ((cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h)))
    gts = gt_instances(mask_png, str(img_path), boxes) if mask_png.is_file() else []
    gt_map = None
    if mask_png.is_file():
        import cv2

        m = cv2.imread(str(mask_png), cv2.IMREAD_GRAYSCALE)
        gt_map = m > 0 if m is not None and m.shape == (h, w) else None
    top = list(dets)[: ev.max_dets]
    boxes = np.array([d.xyxy for d in top], np.float32).reshape(-1, 4)
    if isinstance(seg, YoloSegSegmenter):  # the detector is this model: scores pick the exact anchors
        masks = seg.segment(img, boxes, [d.class_id for d in top], [d.score for d in top])
    else:
        masks = seg.segment(img, boxes, [d.class_id for d in top])
    preds = [PredInstance(str(img_path), d.class_id, d.score, d.xyxy, m) for d, m in zip(top, masks, strict=True)]
    ev.add(str(img_path), (w, h), gts, preds, gt_map)


def predict_split(
    det: Detector | TiledDetector, images: Sequence[Path], batch: int = 8, operating: Thresholds | None = None,
    on_image: Callable[[Path, np.ndarray, Detections], None] | None = None,
) -> tuple[Detections, dict[str, tuple[int, int]], list[float], list[bool], np.ndarray | None]:
    """Run det over the images: (every image's detections, with the image in data["image"]; sizes key ->
    (w, h); top score per image; whether the image FAILs at the operating thresholds (the worker's verdict
    rule); the first image). ``on_image(path, image, detections)`` sees each image as it is done."""
    import cv2

    parts: list[Detections] = []
    sizes: dict[str, tuple[int, int]] = {}
    img_scores: list[float] = []
    img_flags: list[bool] = []
    first: np.ndarray | None = None
    for k in range(0, len(images), batch):
        chunk = images[k:k + batch]
        arrays = []
        for p in chunk:
            a = cv2.imread(str(p), cv2.IMREAD_COLOR)
            if a is None:
                raise TrainingError(f"{p}: unreadable image")
            arrays.append(a)
            sizes[str(p)] = (a.shape[1], a.shape[0])
        if first is None:
            first = arrays[0]
        for p, a, dets in zip(chunk, arrays, det.detect(arrays), strict=True):
            dets.data["image"] = np.full(len(dets), str(p), dtype=object)
            parts.append(dets)
            if on_image is not None:
                on_image(p, a, dets)
            img_scores.append(dets.max_confidence)
            if operating is not None:
                # what the worker keeps (class thresholds) and decides on (verdict rule)
                kept = [d for d in dets if d.score >= operating.score_for(d.class_name)]
                img_flags.append(decide(kept, operating) == FAIL)
    return Detections.merge(parts), sizes, img_scores, img_flags, first


def defective_flags(images: Sequence[Path], gts: Sequence[GroundTruth]) -> list[bool]:
    keys = {g.image for g in gts}
    return [str(p) in keys for p in images]


def open_split(data_dir: Path | str, split: str, settings: Settings | None = None,
               ) -> tuple[Settings, Path, list[Path]]:
    """(settings, the dataset dir, the split's images) for eval and calibrate; TrainingError when the
    dataset or the split is missing or empty."""
    if settings is None:
        from infra.settings import Settings

        settings = Settings()
    data = Path(data_dir).expanduser()
    if not data.exists():
        raise TrainingError(f"--data {data_dir}: no such dataset")
    images = split_images(data, split)
    if not images:
        raise TrainingError(f"{data}: split {split!r} has no images")
    return settings, data, images


# ---- entry point ----------------------------------------------------------------------------------
def evaluate(
    model_uri: str,
    data_dir: Path | str,
    split: str = "test",
    conf: float | None = None,
    iou: float = 0.45,
    *,
    settings: Settings | None = None,
    per_class: Mapping[str, float] | None = None,
    target_fpr: float = 0.05,
    latency: bool = False,
    batch: int = 8,
    tile: TileSpec | None = None,
    segmenter: str = "none",
    sam_model: str | None = None,
) -> dict[str, Any]:
    """Metrics of a model (.onnx path or models:/ URI) on a split of an imported dataset, as one dict.

    conf None and no per_class: the operating point is the model's calibrated one (`sqis calibrate`) when
    it has one, else conf 0.25. tile: run on overlapping tiles (inference_workers/tiling.py).
    segmenter 'yolo-seg' (the model itself, a YOLOv8-seg ONNX) or 'sam' (sam_model: a `sqis sam export`
    dir) adds out['masks']: mask mAP (pycocotools segm), mean mask IoU / Dice per defect, pixel AUROC
    (training/mask_metrics.py), against the dataset's masks/ (connected components)."""
    settings, data, images = open_split(data_dir, split, settings)
    explicit = conf is not None or bool(per_class)
    base = load_detector(settings, model_uri, Thresholds(
        default_score=0.25 if conf is None else conf, iou=iou, per_class=dict(per_class or {}), source="cli",
    ) if explicit else None)
    operating = base.thresholds
    if not explicit and operating.source == "settings":
        operating = Thresholds(default_score=operating.default_score, iou=iou, source="settings")
    det: Detector | TiledDetector = base.with_thresholds(Thresholds(default_score=MAP_CONF, iou=operating.iou))
    if tile is not None:
        det = TiledDetector(det, tile)  # type: ignore[arg-type]
    names = det.class_names
    _check_classes(data, names)
    op_thr = {c: operating.score_for(n) for c, n in enumerate(names)}
    seg, mask_eval = _mask_setup(segmenter, sam_model, settings, base, names, op_thr)
    on_image = None
    if seg is not None and mask_eval is not None:
        def on_image(p: Path, a: np.ndarray, dets: Detections) -> None:
            _add_masks(seg, mask_eval, data, split, p, a, dets)
    t0 = time.perf_counter()
    preds, sizes, img_scores, img_flags, first = predict_split(det, images, batch, operating, on_image)
    wall = time.perf_counter() - t0
    gts = load_ground_truth(images, sizes)
    defective = defective_flags(images, gts)
    metrics = detection_metrics(preds, gts, names, op_thr)
    out: dict[str, Any] = {
        "model": {"uri": model_uri, "name": det.name, "version": det.version, "arch": getattr(base, "arch", None),
                  "imgsz": list(det.imgsz),
                  "classes": names, "providers": det.providers},
        "data": str(data), "split": split, "images": len(images), "gt_boxes": len(gts),
        "defect_free_images": len(images) - sum(defective),
        "conf": operating.default_score, "iou": operating.iou, "per_class_thresholds": dict(operating.per_class),
        "thresholds": operating.to_dict(), "map_conf": MAP_CONF,
        "tile": None if tile is None else {"size": tile.size, "overlap": tile.overlap},
        **metrics,
        "image_level": image_level_metrics(img_scores, defective, target_fpr, img_flags),
        "eval_wall_s": round(wall, 2),
    }
    if mask_eval is not None and seg is not None:
        out["masks"] = {"segmenter": seg.name, **mask_eval.result()}
    if latency:
        assert first is not None
        out["latency_ms_per_image"] = measure_latency(det, first, threads=settings.onnx_threads)
        out["latency_ms_per_image"]["image_size"] = list(first.shape[:2])  # type: ignore[assignment]
    log.info("evaluated", extra={"model_uri": model_uri, "split": split, "map50": out["map50"],
                                 "map50_95": out["map50_95"], "images": len(images),
                                 "thresholds_source": operating.source})
    return out
