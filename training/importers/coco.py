"""COCO detection JSON (instances_*.json, or Roboflow's <split>/_annotations.coco.json); docs/formats/coco.md.

Layouts found, in this order:
- SRC/annotations/*.json (COCO 2017: instances_train2017.json; images in SRC/train2017/, SRC/images/train/
  or SRC/images/), the split taken from the file name (train / val / test, else no fixed split);
- SRC/<split>/_annotations.coco.json (Roboflow export; images next to the JSON);
- SRC/*.json (one file; split seeded).
`bbox` is [x, y, width, height] in pixels from the top-left corner. Category ids may be any integers
(COCO's start at 1 and have gaps): classes are the categories in id order, numbered from 0. Polygon
segmentations are kept as polygons; RLE masks and crowd regions are boxes only.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.datasets import (
    SPLITS,
    DatasetError,
    Problems,
    Sample,
    SourceDataset,
    image_size,
    make_box,
    progress,
)

if TYPE_CHECKING:
    from training.importers import ImportOptions

log = logging.getLogger(__name__)

DOC = "docs/formats/coco.md"


def _split_of_name(name: str) -> str | None:
    low = name.lower()
    for sp, words in (("train", ("train",)), ("val", ("val", "valid")), ("test", ("test",))):
        if any(w in low for w in words):
            return sp
    return None


def _annotation_files(src: Path) -> list[tuple[Path, str | None]]:
    found: list[tuple[Path, str | None]] = []
    if (src / "annotations").is_dir():
        found = [(p, _split_of_name(p.stem)) for p in sorted((src / "annotations").glob("*.json"))]
    if not found:
        found = [(src / d / "_annotations.coco.json", _split_of_name(d))
                 for d in sorted(x.name for x in src.iterdir() if x.is_dir())
                 if (src / d / "_annotations.coco.json").is_file()]
    if not found:
        found = [(p, _split_of_name(p.stem)) for p in sorted(src.glob("*.json"))]
    if not found:
        raise DatasetError(f"{src}: no COCO JSON (looked for annotations/*.json, <split>/_annotations.coco.json "
                           f"and *.json; see {DOC})")
    splits = [sp for _, sp in found]
    if len(found) > 1 and (None in splits or len(set(splits)) != len(splits)):
        raise DatasetError(f"{src}: cannot tell the split of each of {[p.name for p, _ in found]} (name them "
                           f"*train*, *val*, *test*, or keep one file; see {DOC})")
    return found


def _image_dirs(src: Path, ann: Path, split: str | None) -> list[Path]:
    cands = [ann.parent]
    stem = ann.stem.removeprefix("instances_")
    for base in (src, src / "images"):
        cands += [base / stem] + ([base / split, base / f"{split}2017"] if split else []) + [base]
    return list(dict.fromkeys(c for c in cands if c.is_dir()))


def _load(ann: Path) -> dict[str, Any]:
    try:
        doc = json.loads(ann.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{ann}: not a readable JSON file ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list) or not isinstance(
            doc.get("categories"), list):
        raise DatasetError(f"{ann}: not COCO detection JSON (needs `images`, `annotations` and `categories` "
                           f"lists; see {DOC})")
    return doc


def _categories(docs: list[tuple[Path, dict[str, Any]]]) -> tuple[list[str], dict[int, int]]:
    """Class names in category-id order and category id -> class index (0-based)."""
    cats: dict[int, str] = {}
    used: set[int] = set()
    parent_only: set[int] = set()
    for ann, doc in docs:
        for c in doc["categories"]:
            try:
                cid, name = int(c["id"]), str(c["name"])
            except (KeyError, TypeError, ValueError):
                raise DatasetError(f"{ann}: a category without an integer `id` and a `name`: {c!r}") from None
            if cats.get(cid, name) != name:
                raise DatasetError(f"{ann}: category id {cid} is {name!r} here but {cats[cid]!r} in another file")
            cats[cid] = name
            if str(c.get("supercategory", "")) == "none":
                parent_only.add(cid)  # Roboflow's dataset-level parent category
        used |= {int(a.get("category_id", -1)) for a in doc.get("annotations") or []}
    keep = sorted(cid for cid in cats if cid in used or cid not in parent_only)
    return [cats[c] for c in keep], {c: i for i, c in enumerate(keep)}


def _box(a: dict[str, Any], ann: Path, w: int, h: int) -> tuple[float, float, float, float]:
    where = f"{ann}: annotation {a.get('id')}"
    bb = a.get("bbox")
    if not (isinstance(bb, list) and len(bb) == 4):
        raise DatasetError(f"{where}: `bbox` must be [x, y, width, height]")
    x, y, bw, bh = (float(v) for v in bb)
    if max(x, y, bw, bh) <= 1.0 and max(w, h) > 2:
        raise DatasetError(f"{where}: bbox {bb} looks normalised (0-1); COCO boxes are in pixels "
                           f"([x, y, width, height]; normalised 0-1 boxes are the `yolo` format)")
    if (x + bw > w + 2 or y + bh > h + 2) and bw > x and bh > y and bw <= w + 2 and bh <= h + 2:
        raise DatasetError(f"{where}: bbox {bb} runs past the {w}x{h} image as [x, y, width, height]; "
                           f"is it [x1, y1, x2, y2]? (that is the `pixel-boxes` format)")
    return x, y, x + bw, y + bh


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    files = _annotation_files(src)
    docs = [(ann, _load(ann)) for ann, _ in files]
    names, index = _categories(docs)
    if opts.classes and list(opts.classes) != names:
        raise DatasetError(f"{src}: categories {names} differ from --classes {list(opts.classes)}")
    samples: list[Sample] = []
    seen: set[str] = set()
    notes: list[str] = []
    crowd = 0
    for (ann, doc), (_, split) in zip(docs, files, strict=True):
        dirs = _image_dirs(src, ann, split)
        by_image: dict[Any, list[dict[str, Any]]] = {}
        for a in doc.get("annotations") or []:
            by_image.setdefault(a.get("image_id"), []).append(a)
        for im in progress(doc["images"], f"reading {ann.name}"):
            with problems.check():
                fn = str(im.get("file_name") or "")
                path = next((d / fn for d in dirs if (d / fn).is_file()), None)
                if path is None:
                    raise DatasetError(f"{ann}: image {fn!r} (id {im.get('id')}) not found in "
                                       f"{', '.join(str(d) for d in dirs)}")
                w, h = image_size(path)
                boxes, polys = [], []
                for a in by_image.get(im.get("id"), []):
                    cid = a.get("category_id")
                    if cid not in index:
                        raise DatasetError(f"{ann}: annotation {a.get('id')} has category_id {cid}, which is not in "
                                           f"`categories` (ids {sorted(index)})")
                    cls = index[cid]
                    crowd += bool(a.get("iscrowd"))
                    x1, y1, x2, y2 = _box(a, ann, w, h)
                    b = make_box(cls, x1, y1, x2, y2, w, h, f"{ann}: annotation {a.get('id')}")
                    if b is None:
                        continue
                    boxes.append(b)
                    seg = a.get("segmentation")
                    if isinstance(seg, list) and not a.get("iscrowd"):
                        for poly in seg:
                            if isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0:
                                pts = np.clip(np.array(poly, dtype=np.float64).reshape(-1, 2), 0, [w, h])
                                polys.append((cls, pts))
                stem = Path(fn).with_suffix("").as_posix()
                name = stem.replace("/", "_")
                if name in seen:
                    name = f"{split}_{name}"
                if name in seen:
                    raise DatasetError(f"{ann}: image {fn!r} is listed twice")
                seen.add(name)
                samples.append(Sample(key=stem, name=name, image=path, width=w, height=h, boxes=boxes,
                                      polygons=polys, source_split=split if split in SPLITS else None))
    if crowd:
        notes.append(f"{crowd} crowd (iscrowd=1) annotations imported as plain boxes")
    return SourceDataset(format="coco", source=src, classes=names, samples=samples, notes=notes)
