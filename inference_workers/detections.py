"""One columnar detections type, in the spirit of supervision's ``Detections``.

Every stage holds boxes the same way: numpy columns ``xyxy`` [n, 4] (pixels), ``confidence`` [n],
``class_id`` [n], the class names they index, optional per-detection masks (COCO uncompressed RLE,
the Inspection schema's ``Mask`` record) and free extra columns in ``data`` (evaluation keeps the
image each detection belongs to there). Adapters build it from a YOLOv8 ONNX output
(:meth:`Detections.from_onnx_output`), an RT-DETR one (:meth:`Detections.from_rtdetr_output`) or an
Ultralytics result (:meth:`Detections.from_ultralytics`, duck-typed, so this module never imports torch). Iterating yields :class:`Detection` rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inference_workers.nms import decode_rtdetr, decode_yolov8

__all__ = ["Detection", "Detections", "Mask"]

Mask = dict[str, Any]  # {"height", "width", "counts" (column-major runs, zeros first), "area"}


@dataclass
class Detection:
    """One row of :class:`Detections`; box in original-image pixels (x1, y1, x2, y2)."""

    class_id: int
    class_name: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float
    mask: Mask | None = None

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_avro(self, mask: Mask | None = None) -> dict[str, Any]:
        """An Inspection 'detections' item."""
        return {
            "class_id": self.class_id, "class_name": self.class_name, "score": self.score,
            "x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2, "mask": mask or self.mask,
        }


def _col(a: Any, dtype: Any, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(a if a is not None else np.zeros(shape), dtype=dtype).reshape(shape)


def _numpy(t: Any) -> np.ndarray:
    """A torch tensor (any device) or an array-like as numpy, without importing torch."""
    if hasattr(t, "detach"):
        t = t.detach()
    if hasattr(t, "cpu"):
        t = t.cpu()
    if hasattr(t, "numpy"):
        return np.asarray(t.numpy())
    return np.asarray(t)


@dataclass(eq=False)
class Detections:
    """Detections of one image (or of many, with an image column in ``data``), as numpy columns."""

    xyxy: np.ndarray
    confidence: np.ndarray
    class_id: np.ndarray
    class_names: Sequence[str] = ()
    masks: list[Mask | None] | None = None
    data: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(np.asarray(self.confidence).reshape(-1))
        self.xyxy = _col(self.xyxy, np.float64, (n, 4))
        self.confidence = _col(self.confidence, np.float32, (n,))
        self.class_id = _col(self.class_id, np.int64, (n,))
        self.class_names = tuple(str(c) for c in self.class_names)
        if self.masks is not None and len(self.masks) != n:
            raise ValueError(f"{len(self.masks)} masks for {n} detections")
        self.data = {k: np.asarray(v) for k, v in self.data.items()}
        for k, v in self.data.items():
            if len(v) != n:
                raise ValueError(f"data column {k!r} has {len(v)} rows for {n} detections")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def empty(cls, class_names: Sequence[str] = ()) -> Detections:
        return cls(np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64), class_names)

    @classmethod
    def from_onnx_output(
        cls, pred: np.ndarray, class_thresholds: np.ndarray, iou_threshold: float, *,
        class_names: Sequence[str] = (), letterbox: Any = None, max_det: int = 300, max_nms: int = 30000,
    ) -> Detections:
        """One image's YOLOv8 ONNX output [4+nc, N]: per-class thresholds, per-class NMS and, with the
        image's ``letterbox`` meta (gain_x/y, pad_x/y, width, height), boxes mapped back to its pixels."""
        d = cls(*decode_yolov8(pred, class_thresholds, iou_threshold, max_det=max_det, max_nms=max_nms),
                class_names=class_names)
        return d._unletterboxed(letterbox)

    @classmethod
    def from_rtdetr_output(
        cls, pred: np.ndarray, class_thresholds: np.ndarray, input_hw: tuple[int, int], *,
        class_names: Sequence[str] = (), letterbox: Any = None, max_det: int = 300,
    ) -> Detections:
        """One image's RT-DETR ONNX output [K, 6] (normalised cx, cy, w, h, score, class; NMS-free):
        per-class thresholds and, with the image's resize meta, boxes mapped back to its pixels."""
        d = cls(*decode_rtdetr(pred, class_thresholds, input_hw, max_det=max_det), class_names=class_names)
        return d._unletterboxed(letterbox)

    def _unletterboxed(self, letterbox: Any) -> Detections:
        """Boxes from model-input pixels to the image's (gain_x/y, pad_x/y, width, height), clipped."""
        if letterbox is not None and len(self):
            m = letterbox
            b = self.xyxy
            b[:, [0, 2]] = np.clip((b[:, [0, 2]] - m.pad_x) / m.gain_x, 0, m.width)
            b[:, [1, 3]] = np.clip((b[:, [1, 3]] - m.pad_y) / m.gain_y, 0, m.height)
        return self

    @classmethod
    def from_ultralytics(cls, result: Any) -> Detections:
        """An Ultralytics ``Results`` (one image): ``result.boxes.{xyxy,conf,cls}`` and ``result.names``;
        ``result.masks`` (if any) become RLE masks."""
        boxes = result.boxes
        names = getattr(result, "names", None) or {}
        class_names = [str(names[k]) for k in sorted(names)] if isinstance(names, Mapping) else list(names)
        xyxy = _numpy(boxes.xyxy).astype(np.float64).reshape(-1, 4)
        masks = None
        if getattr(result, "masks", None) is not None and getattr(result.masks, "data", None) is not None:
            masks = [rle_encode(m > 0.5) for m in _numpy(result.masks.data)]
        return cls(xyxy, _numpy(boxes.conf), _numpy(boxes.cls).astype(np.int64), class_names, masks)

    @classmethod
    def from_rows(cls, rows: Sequence[Detection] | Detections, class_names: Sequence[str] = ()) -> Detections:
        """Rows (a duck-typed detector's output) as columns; class names from ``class_names`` and the rows."""
        if isinstance(rows, Detections):
            return rows
        rows = list(rows)
        names = list(class_names)
        for d in rows:
            while len(names) <= d.class_id:
                names.append(f"class{len(names)}")
            names[d.class_id] = d.class_name
        masks = [d.mask for d in rows] if any(d.mask for d in rows) else None
        return cls(np.array([d.xyxy for d in rows], np.float64).reshape(-1, 4), [d.score for d in rows],
                   [d.class_id for d in rows], names, masks)

    @classmethod
    def merge(cls, parts: Sequence[Detections]) -> Detections:
        """Concatenate (same class names, same data columns)."""
        if not parts:
            return cls.empty()
        names = parts[0].class_names
        masks = None
        if any(p.masks is not None for p in parts):
            masks = [m for p in parts for m in (p.masks if p.masks is not None else [None] * len(p))]
        keys = set(parts[0].data)
        return cls(np.concatenate([p.xyxy for p in parts]), np.concatenate([p.confidence for p in parts]),
                   np.concatenate([p.class_id for p in parts]), names, masks,
                   {k: np.concatenate([p.data[k] for p in parts]) for k in keys})

    # ---- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.confidence.shape[0])

    def class_name(self, i: int) -> str:
        c = int(self.class_id[i])
        return self.class_names[c] if 0 <= c < len(self.class_names) else f"class{c}"

    def _row(self, i: int) -> Detection:
        b = self.xyxy[i]
        return Detection(int(self.class_id[i]), self.class_name(i), float(self.confidence[i]),
                         float(b[0]), float(b[1]), float(b[2]), float(b[3]),
                         self.masks[i] if self.masks is not None else None)

    def __iter__(self) -> Iterator[Detection]:
        return (self._row(i) for i in range(len(self)))

    def __getitem__(self, index: Any) -> Any:
        """An int gives a :class:`Detection` row; a slice, index array or boolean mask gives Detections."""
        if isinstance(index, int | np.integer):
            return self._row(int(index) if index >= 0 else len(self) + int(index))
        idx = np.arange(len(self))[index]
        masks = [self.masks[int(i)] for i in idx] if self.masks is not None else None
        return Detections(self.xyxy[idx], self.confidence[idx], self.class_id[idx], self.class_names, masks,
                          {k: v[idx] for k, v in self.data.items()})

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list | tuple):
            return list(self) == list(other)
        if not isinstance(other, Detections):
            return NotImplemented
        return (np.array_equal(self.xyxy, other.xyxy) and np.array_equal(self.confidence, other.confidence)
                and np.array_equal(self.class_id, other.class_id) and self.class_names == other.class_names
                and self.masks == other.masks)

    def __repr__(self) -> str:
        return f"Detections(n={len(self)}, classes={list(self.class_names)}, masks={self.masks is not None})"

    @property
    def max_confidence(self) -> float:
        return float(self.confidence.max()) if len(self) else 0.0

    def with_masks(self, masks: Sequence[Mask | None]) -> Detections:
        """The same detections with one mask (RLE dict or None) per row (the segmenter attaches them)."""
        return Detections(self.xyxy, self.confidence, self.class_id, self.class_names, list(masks), dict(self.data))

    def above(self, thresholds: Mapping[int, float] | float) -> np.ndarray:
        """Boolean mask of rows whose confidence >= their class's threshold."""
        if isinstance(thresholds, Mapping):
            thr = np.array([thresholds.get(int(c), 0.25) for c in self.class_id], dtype=np.float64)
        else:
            thr = np.full(len(self), float(thresholds))
        return self.confidence.astype(np.float64) >= thr

    def to_avro(self) -> list[dict[str, Any]]:
        """The Inspection record's 'detections' array."""
        return [d.to_avro() for d in self]


def rle_encode(mask: np.ndarray) -> Mask:
    """A binary [h, w] mask as COCO uncompressed RLE (column-major, starting with a run of zeros)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.T.reshape(-1)
    if flat.size == 0:
        return {"height": int(h), "width": int(w), "counts": [], "area": 0}
    bounds = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1, [flat.size]])
    counts = [int(x) for x in np.diff(bounds)]
    if flat[0]:
        counts.insert(0, 0)
    return {"height": int(h), "width": int(w), "counts": counts, "area": int(m.sum())}


def rle_decode(rle: Mask) -> np.ndarray:
    """Inverse of :func:`rle_encode`."""
    h, w = int(rle["height"]), int(rle["width"])
    flat = np.zeros(h * w, dtype=bool)
    pos, val = 0, False
    for n in rle["counts"]:
        if val:
            flat[pos:pos + n] = True
        pos += n
        val = not val
    return flat.reshape(w, h).T
