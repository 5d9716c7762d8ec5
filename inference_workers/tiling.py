"""Tiled inference for small defects in large frames: overlapping tiles -> one batched detector run ->
boxes mapped back to the frame -> merged across tile borders (a defect cut by a border is one box).

A frame is still one Inspection: the tiled detector returns one detection list per frame, like Detector.
Pure numpy (plus the wrapped detector); no torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.detections import Detection, Detections
from inference_workers.detector import Thresholds
from inference_workers.nms import box_iou

if TYPE_CHECKING:
    from inference_workers.detector import Detector

__all__ = ["TileSpec", "TiledDetector", "merge_tiled", "merge_tiled_detections", "tile_grid", "tile_origins"]

BORDER_PX = 2.0  # a box edge this close to an inner tile border is "cut" by it
MIN_IOS = 0.5  # a cut box merges with a box of another tile that covers this much of the smaller one


@dataclass(frozen=True)
class TileSpec:
    """Square tiles of `size` pixels (of the original frame) overlapping by the fraction `overlap`."""

    size: int
    overlap: float = 0.2

    def __post_init__(self) -> None:
        if self.size < 32:
            raise ValueError(f"tile size {self.size}: must be >= 32 pixels")
        if not 0.0 <= self.overlap < 0.9:
            raise ValueError(f"tile overlap {self.overlap}: must be within [0, 0.9)")


def tile_origins(length: int, size: int, overlap: float) -> list[int]:
    """Start offsets along one axis: tiles of `size` covering [0, length), consecutive ones overlapping by
    at least `overlap` * size, spread evenly so the last tile ends at the frame edge."""
    if length <= size:
        return [0]
    stride = max(1, math.floor(size * (1.0 - overlap)))
    n = math.ceil((length - size) / stride) + 1
    return [round(i * (length - size) / (n - 1)) for i in range(n)]


def tile_grid(width: int, height: int, spec: TileSpec) -> list[tuple[int, int, int, int]]:
    """Tiles (x0, y0, x1, y1) of a width x height frame, row by row; a frame smaller than a tile is one tile."""
    xs = tile_origins(width, spec.size, spec.overlap)
    ys = tile_origins(height, spec.size, spec.overlap)
    return [(x, y, min(x + spec.size, width), min(y + spec.size, height)) for y in ys for x in xs]


def _cut_sides(box: tuple[float, float, float, float], tile: tuple[int, int, int, int], width: int,
               height: int) -> tuple[bool, bool, bool, bool]:
    """Which sides (left, top, right, bottom) of a box touch an inner border of its tile (not the frame's)."""
    x1, y1, x2, y2 = box
    tx0, ty0, tx1, ty1 = tile
    return (tx0 > 0 and x1 - tx0 <= BORDER_PX, ty0 > 0 and y1 - ty0 <= BORDER_PX,
            tx1 < width and tx1 - x2 <= BORDER_PX, ty1 < height and ty1 - y2 <= BORDER_PX)


def merge_tiled(dets: Sequence[Detection], tiles: Sequence[int], tile_boxes: Sequence[tuple[int, int, int, int]],
                width: int, height: int, iou: float = 0.45) -> list[Detection]:
    """:func:`merge_tiled_detections` for rows (dets[i] came from tile_boxes[tiles[i]])."""
    from inference_workers.inference import as_detections

    return list(merge_tiled_detections(as_detections(dets), np.asarray(tiles, np.int64), tile_boxes, width, height, iou))


def merge_tiled_detections(dets: Detections, tiles: np.ndarray, tile_boxes: Sequence[tuple[int, int, int, int]],
                           width: int, height: int, iou: float = 0.45) -> Detections:
    """Merge frame-coordinate detections from overlapping tiles (row i came from tile_boxes[tiles[i]]).

    Two detections of one class from different tiles are one defect when they overlap by more than `iou`
    (the same defect seen twice in the overlap), or when one of them is cut by an inner tile border and
    their intersection covers at least MIN_IOS of the smaller box (a defect split by the border: both
    parts lie in the tiles' overlap). Each group becomes the union box with the highest score.
    """
    n = len(dets)
    if n == 0:
        return Detections.empty(dets.class_names)
    boxes = dets.xyxy.astype(np.float64)
    ious = box_iou(boxes, boxes)
    lt = np.maximum(boxes[:, None, :2], boxes[None, :, :2])
    rb = np.minimum(boxes[:, None, 2:], boxes[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area = np.clip(boxes[:, 2:] - boxes[:, :2], 0, None).prod(-1)
    smaller = np.minimum(area[:, None], area[None, :])
    ios = np.where(smaller > 0, inter / np.where(smaller > 0, smaller, 1.0), 0.0)
    cut = [any(_cut_sides(tuple(boxes[i]), tile_boxes[int(tiles[i])], width, height)) for i in range(n)]
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i in range(n):
        for j in range(i + 1, n):
            if tiles[i] == tiles[j] or dets.class_id[i] != dets.class_id[j]:
                continue
            if ious[i, j] > iou or ((cut[i] or cut[j]) and ios[i, j] >= MIN_IOS):
                parent[find(j)] = find(i)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    members = list(groups.values())
    best = np.array([m[int(np.argmax(dets.confidence[m]))] for m in members], np.int64)
    union = np.array([[boxes[m, 0].min(), boxes[m, 1].min(), boxes[m, 2].max(), boxes[m, 3].max()] for m in members])
    order = np.argsort(-dets.confidence[best].astype(np.float64), kind="stable")
    return Detections(union[order], dets.confidence[best][order], dets.class_id[best][order], dets.class_names)


class TiledDetector:
    """A Detector run on overlapping tiles of each frame; same detect() contract (one list per frame).

    It has no preprocess/infer/postprocess stages on purpose: callers that time stages fall back to detect().
    """

    def __init__(self, detector: Detector, spec: TileSpec, max_tiles_per_run: int = 32) -> None:
        self.detector = detector
        self.spec = spec
        self.max_tiles_per_run = max_tiles_per_run

    # the attributes the worker, eval and calibrate read from a Detector
    name = property(lambda self: self.detector.name)
    version = property(lambda self: self.detector.version)
    thresholds = property(lambda self: self.detector.thresholds)
    class_names = property(lambda self: self.detector.class_names)
    imgsz = property(lambda self: self.detector.imgsz)
    providers = property(lambda self: self.detector.providers)
    path = property(lambda self: self.detector.path)
    max_det = property(lambda self: self.detector.max_det)

    def with_thresholds(self, thresholds: Thresholds) -> TiledDetector:
        return TiledDetector(self.detector.with_thresholds(thresholds), self.spec, self.max_tiles_per_run)

    def __repr__(self) -> str:
        return f"TiledDetector({self.detector!r}, tile={self.spec.size}, overlap={self.spec.overlap})"

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
        from inference_workers.inference import as_detections

        crops: list[np.ndarray] = []
        owner: list[tuple[int, int]] = []  # (image index, tile index) of each crop
        grids: list[list[tuple[int, int, int, int]]] = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            grid = tile_grid(w, h, self.spec)
            grids.append(grid)
            for t, (x0, y0, x1, y1) in enumerate(grid):
                crops.append(img[y0:y1, x0:x1])
                owner.append((i, t))
        per_crop: list[Detections] = []
        for k in range(0, len(crops), self.max_tiles_per_run):
            per_crop += [as_detections(d, self.class_names) for d in self.detector.detect(crops[k:k + self.max_tiles_per_run])]
        found: list[list[Detections]] = [[] for _ in images]
        tiles: list[list[np.ndarray]] = [[] for _ in images]
        for (i, t), dets in zip(owner, per_crop, strict=True):
            x0, y0 = grids[i][t][:2]
            shifted = Detections(dets.xyxy + np.array([x0, y0, x0, y0], np.float64), dets.confidence, dets.class_id,
                                 dets.class_names)
            found[i].append(shifted)
            tiles[i].append(np.full(len(dets), t, np.int64))
        out = []
        for i, img in enumerate(images):
            h, w = img.shape[:2]
            dets = Detections.merge(found[i]) if found[i] else Detections.empty(self.class_names)
            t_idx = np.concatenate(tiles[i]) if tiles[i] else np.zeros(0, np.int64)
            merged = merge_tiled_detections(dets, t_idx, grids[i], w, h, self.thresholds.iou)
            out.append(merged[: self.max_det])
        return out

    def warmup(self, batch_size: int = 1) -> None:
        self.detector.warmup(batch_size)

    def __getattr__(self, item: str) -> Any:
        if item in ("preprocess", "infer", "postprocess", "detector"):
            raise AttributeError(item)
        return getattr(self.detector, item)
