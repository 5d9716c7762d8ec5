"""Tile an imported dataset: each image becomes the overlapping tiles the tiled detector will see
(inference_workers/tiling.py), boxes clipped to each tile, splits kept. A model trained on it sees defects
at the scale `--tile` serves them at.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from inference_workers.tiling import TileSpec, tile_grid
from training.datasets import IMAGE_EXTS, SPLITS, DatasetError, progress
from training.importers.yolo import label_path

log = logging.getLogger(__name__)

MIN_KEPT_SHARE = 0.25  # a box cut by a tile border is kept in a tile holding at least this share of it...
MIN_KEPT_PX = 64.0  # ...or at least this many square pixels of it
MIN_SIDE_PX = 2.0


def _boxes(lbl: Path, w: int, h: int) -> list[tuple[int, float, float, float, float]]:
    out = []
    if lbl.is_file():
        for line in lbl.read_text().splitlines():
            v = line.split()
            if len(v) == 5:
                c, cx, cy, bw, bh = int(v[0]), *map(float, v[1:])
                out.append((c, (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h))
    return out


def clip_to_tile(boxes: list[tuple[int, float, float, float, float]], tile: tuple[int, int, int, int]
                 ) -> list[tuple[int, float, float, float, float]]:
    """Boxes clipped to the tile, in tile pixels; a box keeps a piece big enough to be learnt from."""
    x0, y0, x1, y1 = tile
    out = []
    for c, bx1, by1, bx2, by2 in boxes:
        cx1, cy1, cx2, cy2 = max(bx1, x0), max(by1, y0), min(bx2, x1), min(by2, y1)
        if cx2 - cx1 < MIN_SIDE_PX or cy2 - cy1 < MIN_SIDE_PX:
            continue
        area, full = (cx2 - cx1) * (cy2 - cy1), max((bx2 - bx1) * (by2 - by1), 1e-9)
        if area >= MIN_KEPT_SHARE * full or area >= MIN_KEPT_PX:
            out.append((c, cx1 - x0, cy1 - y0, cx2 - x0, cy2 - y0))
    return out


def tile_dataset(src: Path, out: Path, spec: TileSpec, force: bool = False, train_empty_frac: float = 1.0,
                 seed: int = 0) -> dict[str, Any]:
    """Write the tiled copy of an imported dataset SRC to OUT; returns per-split counts.

    train_empty_frac: the share of defect-free train tiles kept (seeded); val and test keep every tile,
    so they score what inference will see.
    """
    import random

    import cv2
    import yaml

    rng = random.Random(seed)
    y = src / "data.yaml"
    if not y.is_file():
        raise DatasetError(f"{src}: not an imported dataset (no data.yaml); run `sqis data import` first")
    cfg = yaml.safe_load(y.read_text()) or {}
    if out.exists():
        if not force:
            raise DatasetError(f"{out} exists (use --force to replace it)")
        shutil.rmtree(out)
    stats: dict[str, Any] = {}
    for sp in SPLITS:
        img_dir = src / "images" / sp
        if not img_dir.is_dir():
            continue
        (out / "images" / sp).mkdir(parents=True)
        (out / "labels" / sp).mkdir(parents=True)
        n_img = n_tiles = n_boxes = n_empty = 0
        for img_path in progress(sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS), f"tiling {sp}"):
            img = cv2.imread(str(img_path), cv2.IMREAD_UNCHANGED)
            if img is None:
                raise DatasetError(f"{img_path}: unreadable image")
            h, w = img.shape[:2]
            boxes = _boxes(label_path(img_path), w, h)
            n_img += 1
            for tile in tile_grid(w, h, spec):
                x0, y0, x1, y1 = tile
                tw, th = x1 - x0, y1 - y0
                name = f"{img_path.stem}_x{x0}_y{y0}"
                kept = clip_to_tile(boxes, tile)
                if not kept and sp == "train" and train_empty_frac < 1.0 and rng.random() >= train_empty_frac:
                    continue
                cv2.imwrite(str(out / "images" / sp / f"{name}.png"), img[y0:y1, x0:x1])
                (out / "labels" / sp / f"{name}.txt").write_text("".join(
                    f"{c} {(a + b) / 2 / tw:.6f} {(d + e) / 2 / th:.6f} {(b - a) / tw:.6f} {(e - d) / th:.6f}\n"
                    for c, a, d, b, e in kept))
                n_tiles += 1
                n_boxes += len(kept)
                n_empty += not kept
        stats[sp] = {"images": n_img, "tiles": n_tiles, "boxes": n_boxes, "defect_free_tiles": n_empty}
    names = cfg.get("names")
    doc = {"path": str(out.resolve()), **{sp: f"images/{sp}" for sp in stats}, "names": names}
    (out / "data.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    card = {"format": "tiled", "source": str(src.resolve()), "tile": spec.size, "overlap": spec.overlap,
            "train_empty_frac": train_empty_frac, "seed": seed,
            "classes": [names[k] for k in sorted(names)] if isinstance(names, dict) else names, "splits": stats}
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")
    log.info("dataset tiled", extra={"src": str(src), "out": str(out), "tile": spec.size, "overlap": spec.overlap})
    return stats
