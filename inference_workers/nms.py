"""Pure-numpy post-processing for YOLOv8 heads: box conversion, IoU, per-class NMS and output decoding.

No torch here: the serving side runs on onnxruntime + numpy only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["box_iou", "decode_yolov8", "nms", "xywh2xyxy"]

MAX_WH = 7680.0  # per-class coordinate offset so one NMS pass never suppresses across classes


def xywh2xyxy(b: np.ndarray) -> np.ndarray:
    """(cx, cy, w, h) -> (x1, y1, x2, y2) along the last axis."""
    out = np.empty_like(b)
    half_w, half_h = b[..., 2] / 2, b[..., 3] / 2
    out[..., 0] = b[..., 0] - half_w
    out[..., 1] = b[..., 1] - half_h
    out[..., 2] = b[..., 0] + half_w
    out[..., 3] = b[..., 1] + half_h
    return out


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes: [n, 4] x [m, 4] -> [n, m]."""
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    wh = np.clip(rb - lt, 0, None)
    inter = wh[..., 0] * wh[..., 1]
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def nms(
    boxes: np.ndarray, scores: np.ndarray, iou_threshold: float, class_ids: np.ndarray | None = None,
    max_det: int = 300,
) -> np.ndarray:
    """Greedy NMS (per class when class_ids is given); returns kept indices, highest score first.

    A box is suppressed when its IoU with a kept box of the same class is > iou_threshold.
    """
    n = len(scores)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    b = np.asarray(boxes, dtype=np.float32)
    if class_ids is not None:  # shift each class to its own region: one pass does per-class NMS
        b = b + (np.asarray(class_ids, dtype=np.float32) * MAX_WH)[:, None]
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    keep: list[int] = []
    while order.size and len(keep) < max_det:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        if not rest.size:
            break
        w = np.clip(np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]), 0, None)
        h = np.clip(np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        iou = np.where(union > 0, inter / np.maximum(union, 1e-9), 0.0)
        order = rest[iou <= iou_threshold]
    return np.asarray(keep, dtype=np.int64)


def decode_yolov8(
    pred: np.ndarray, class_thresholds: np.ndarray, iou_threshold: float, max_det: int = 300,
    max_nms: int = 30000,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's YOLOv8 output [4+nc, N] (cx, cy, w, h, class scores), in input pixels:
    the kernel of :meth:`inference_workers.detections.Detections.from_onnx_output`, which callers use.
    Returns (xyxy [k, 4] float32, scores [k] float32, class ids [k] int64).

    Each anchor keeps its best class; it survives when that score is > the class's threshold
    (class_thresholds: [nc]); then per-class NMS.
    """
    if pred.ndim != 2 or pred.shape[0] < 5:
        raise ValueError(f"expected a [4+nc, N] prediction, got shape {pred.shape}")
    nc = pred.shape[0] - 4
    thr = np.asarray(class_thresholds, dtype=np.float32).reshape(-1)
    if thr.shape[0] != nc:
        raise ValueError(f"{thr.shape[0]} class thresholds for {nc} classes")
    cls_scores = pred[4:]  # [nc, N]
    class_ids = cls_scores.argmax(0)
    scores = np.take_along_axis(cls_scores, class_ids[None], 0)[0]
    mask = scores > thr[class_ids]
    if not mask.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    idx = np.flatnonzero(mask)
    if idx.size > max_nms:
        idx = idx[np.argsort(-scores[idx], kind="stable")[:max_nms]]
    boxes = xywh2xyxy(pred[:4, idx].T.astype(np.float32))
    sc = scores[idx].astype(np.float32)
    cl = class_ids[idx].astype(np.int64)
    keep = nms(boxes, sc, iou_threshold, cl, max_det=max_det)
    return boxes[keep], sc[keep], cl[keep]


def decode_rtdetr(
    pred: np.ndarray, class_thresholds: np.ndarray, input_hw: tuple[int, int], max_det: int = 300,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode one image's RT-DETR output [K, 6] (cx, cy, w, h normalised to [0, 1] of the model input,
    sigmoid score, class index), as Ultralytics exports it (RTDETRDecoder.postprocess: the top K
    query x class scores, highest first). NMS-free: a row survives when its score is > its class's
    threshold; at most max_det rows, highest first. Returns (xyxy [k, 4] float32 in input pixels,
    scores [k] float32, class ids [k] int64), as :func:`decode_yolov8` does.
    """
    if pred.ndim != 2 or pred.shape[1] != 6:
        raise ValueError(f"expected an RT-DETR [K, 6] prediction, got shape {pred.shape}")
    thr = np.asarray(class_thresholds, dtype=np.float32).reshape(-1)
    cls = pred[:, 5].astype(np.int64)
    ok = (cls >= 0) & (cls < thr.shape[0])
    ok[ok] = pred[ok, 4] > thr[cls[ok]]
    if not ok.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    idx = np.flatnonzero(ok)
    idx = idx[np.argsort(-pred[idx, 4], kind="stable")[:max_det]]
    h, w = input_hw
    boxes = xywh2xyxy(pred[idx, :4].astype(np.float32)) * np.array([w, h, w, h], np.float32)
    return boxes, pred[idx, 4].astype(np.float32), cls[idx]
