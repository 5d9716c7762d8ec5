"""An existing YOLO dataset (Ultralytics data.yaml): validated and re-laid out in the internal format.

Splits come from the yaml (dirs, .txt lists of images, or lists of either); labels are found the
Ultralytics way (`/images/` -> `/labels/`, extension -> .txt). Segment lines become polygons + boxes.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.datasets import (
    BOX_TOLERANCE_PX,
    IMAGE_EXTS,
    SPLITS,
    DatasetError,
    Problems,
    Sample,
    SourceDataset,
    find_image,
    image_size,
    make_box,
    progress,
)

if TYPE_CHECKING:
    from training.importers import ImportOptions


def _find_yaml(src: Path) -> Path:
    if src.is_file():
        return src
    for n in ("data.yaml", "data.yml", "dataset.yaml"):
        if (src / n).is_file():
            return src / n
    cands = sorted(src.glob("*.yaml")) + sorted(src.glob("*.yml"))
    if len(cands) == 1:
        return cands[0]
    raise DatasetError(f"{src}: no data.yaml")


def _names(data: dict[str, Any], yml: Path) -> list[str]:
    names = data.get("names")
    if isinstance(names, list):
        return [str(n) for n in names]
    if isinstance(names, dict):
        try:
            ids = sorted(int(k) for k in names)
        except ValueError:
            raise DatasetError(f"{yml}: `names` keys must be class ids") from None
        if ids != list(range(len(ids))):
            raise DatasetError(f"{yml}: `names` ids must be 0..{len(ids) - 1}")
        return [str(names[i] if i in names else names[str(i)]) for i in ids]
    if isinstance(data.get("nc"), int):
        return [f"class{i}" for i in range(data["nc"])]
    raise DatasetError(f"{yml}: no `names` (list or dict id -> name)")


def _images_of(entry: Any, base: Path, yml: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        p = Path(str(e))
        p = p if p.is_absolute() else base / p
        if p.is_dir():
            out += sorted(x for x in p.rglob("*") if x.is_file() and x.suffix.lower() in IMAGE_EXTS)
        elif p.is_file() and p.suffix == ".txt":
            for line in p.read_text().splitlines():
                if line.strip():
                    q = Path(line.strip())
                    q = (
                        q
                        if q.is_absolute()
                        else (base / q if not line.startswith("./") else base / line.strip()[2:])
                    )
                    if not q.is_file():
                        raise DatasetError(f"{p}: lists an image that is missing: {line.strip()}")
                    out.append(q)
        else:
            raise DatasetError(f"{yml}: split path {e!r} does not exist ({p})")
    return out


def label_path(img: Path) -> Path:
    """Ultralytics' rule: the last /images/ in the path becomes /labels/, the suffix .txt."""
    parts = list(img.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def _read_label(lbl: Path, img: Path, nc: int) -> tuple[list, list]:
    w, h = image_size(img)
    boxes, polys = [], []
    tol = BOX_TOLERANCE_PX
    for n, line in enumerate(lbl.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        where = f"{lbl}:{n}"
        try:
            cls = int(parts[0])
            vals = [float(v) for v in parts[1:]]
        except ValueError:
            raise DatasetError(f"{where}: not a YOLO label line: {line.strip()!r}") from None
        if not 0 <= cls < nc:
            hint = "; class ids start at 0 (these look 1-based)" if cls == nc else "; class ids start at 0"
            raise DatasetError(f"{where}: unknown class id {cls} (data.yaml has {nc} classes{hint})")
        if vals and (max(vals) > 1.05 or min(vals) < -0.05):  # small overshoots: the pixel checks below
            raise DatasetError(f"{where}: YOLO coordinates are 0-1 (normalised by the image width and height); "
                               f"this line has {max(vals) if max(vals) > 1 else min(vals):g} (pixel corners "
                               f"`x1 y1 x2 y2 class` are the `pixel-boxes` format; see docs/formats/yolo.md)")
        if len(vals) == 4:
            cx, cy, bw, bh = vals
            x1, y1, x2, y2 = (cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h
        elif len(vals) >= 6 and len(vals) % 2 == 0:
            pts = np.array(vals, dtype=np.float64).reshape(-1, 2) * [w, h]
            if (pts < -tol).any() or (pts[:, 0] > w + tol).any() or (pts[:, 1] > h + tol).any():
                raise DatasetError(f"{where}: polygon lies outside the {w}x{h} image")
            pts = np.clip(pts, 0, [w, h])
            polys.append((cls, pts))
            x1, y1 = pts.min(axis=0)
            x2, y2 = pts.max(axis=0)
        else:
            raise DatasetError(f"{where}: expected `class cx cy w h` or `class x1 y1 x2 y2 ...`")
        b = make_box(cls, x1, y1, x2, y2, w, h, where)
        if b is not None:
            boxes.append(b)
    return boxes, polys


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    import yaml

    problems = Problems() if problems is None else problems
    yml = _find_yaml(src)
    try:
        data = yaml.safe_load(yml.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yml}: invalid YAML ({exc})") from None
    names = _names(data, yml)
    if opts.classes and list(opts.classes) != names:
        raise DatasetError(f"{yml}: classes {names} differ from --classes {list(opts.classes)}")
    root = yml.parent
    base = Path(str(data.get("path") or root))
    base = base if base.is_absolute() else (root / base)
    if not base.is_dir():
        base = root  # a stale absolute `path` from another machine: fall back to the yaml's folder
    todo: list[tuple[str, Path]] = []
    for sp in SPLITS:
        if data.get(sp):
            todo += [(sp, p) for p in _images_of(data[sp], base, yml)]
    if not todo:
        raise DatasetError(f"{yml}: no train/val/test images")
    seen: dict[Path, str] = {}
    both: set[Path] = set()
    for sp, p in todo:
        if p in seen and seen[p] != sp:
            problems.add(p, f"listed in both {seen[p]} and {sp}")
            both.add(p)
        seen[p] = sp
    todo = [t for t in dict.fromkeys(todo) if t[1] not in both]
    stems = [p.stem for _, p in todo]
    prefix = len(set(stems)) != len(stems)
    images = {p for _, p in todo}
    samples = []
    for sp, img in progress(todo, "reading labels"):
        with problems.check():
            lbl = label_path(img)
            w, h = image_size(img)
            boxes, polys = _read_label(lbl, img, len(names)) if lbl.is_file() else ([], [])
            name = f"{sp}_{img.stem}" if prefix else img.stem
            samples.append(Sample(key=img.stem, name=name, image=img, width=w, height=h, boxes=boxes,
                                  polygons=polys, source_split=sp))
    # a label file whose image is missing (labels of images not listed in the yaml are fine)
    listed = {label_path(p) for p in images}
    for lbl_dir in sorted({p.parent for p in listed}):
        for lbl in sorted(lbl_dir.glob("*.txt")) if lbl_dir.is_dir() else []:
            if lbl not in listed and find_image(_image_dir(lbl_dir), lbl.stem) is None:
                problems.add(lbl, "label whose image is missing")
    return SourceDataset(
        format="yolo", source=src if src.is_dir() else src.parent, classes=names, samples=samples
    )


def _image_dir(label_dir: Path) -> Path:
    parts = list(label_dir.parts)
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "labels":
            parts[i] = "images"
            break
    return Path(*parts)
