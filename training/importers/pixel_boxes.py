"""Plain pixel boxes: one text file per image, one `x1 y1 x2 y2 class` line per box (docs/formats/pixel-boxes.md).

As PCB-defect sets (DeepPCB) and many factory tools write them. Layout:
    SRC/images/**/<stem>.<ext>     (SRC/images/{train,val,test}/ fixes the splits)
    SRC/labels/**/<stem>.txt       (an image without a label file is defect-free)
    SRC/classes.txt                (optional: one name per line; line 1 is class id 0)
    SRC/splits/                    (optional: {train,val,test}.txt of ids, as every importer takes)
Fields are separated by spaces, tabs or commas; coordinates are pixels, (x1, y1) the top-left corner.
`class` is a class id (0-based, into classes.txt) or a class name.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import (
    IMAGE_EXTS,
    SPLITS,
    Box,
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

DOC = "docs/formats/pixel-boxes.md"
_SEP = re.compile(r"[\s,;]+")


def _read_classes(src: Path) -> list[str] | None:
    p = src / "classes.txt"
    if not p.is_file():
        return None
    names = [ln.strip() for ln in p.read_text().splitlines() if ln.strip()]
    if len(set(names)) != len(names):
        raise DatasetError(f"{p}: a class name is listed twice")
    return names


def _parse(lbl: Path) -> list[tuple[str, tuple[float, float, float, float], str]]:
    out = []
    for n, line in enumerate(lbl.read_text().splitlines(), 1):
        parts = [p for p in _SEP.split(line.strip()) if p]
        if not parts or parts[0].startswith("#"):
            continue
        where = f"{lbl}:{n}"
        if len(parts) != 5:
            raise DatasetError(f"{where}: expected `x1 y1 x2 y2 class`, got {line.strip()!r} (see {DOC})")
        try:
            coords = tuple(float(v) for v in parts[:4])
        except ValueError:
            try:  # `class x1 y1 x2 y2`: say so rather than "not a number"
                [float(v) for v in parts[1:]]
                hint = "; the class comes last in this format"
            except ValueError:
                hint = ""
            raise DatasetError(f"{where}: the first four fields must be pixel coordinates x1 y1 x2 y2{hint}: "
                               f"{line.strip()!r} (see {DOC})") from None
        out.append((parts[4], coords, where))  # type: ignore[arg-type]
    return out


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    img_dir, lbl_dir = src / "images", src / "labels"
    for d, what in ((img_dir, "images"), (lbl_dir, "labels")):
        if not d.is_dir():
            raise DatasetError(f"{src}: no {what}/ directory (expected images/ and labels/; see {DOC})")
    images = sorted(p for p in img_dir.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise DatasetError(f"{img_dir}: no images")
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            problems.add(p, f"another image has the stem {p.stem!r} ({by_stem[p.stem]}); stems pair "
                            f"images with labels and must be unique")
            continue
        by_stem[p.stem] = p
    images = list(by_stem.values())
    labels = {p.stem: p for p in sorted(lbl_dir.rglob("*.txt"))}
    for stem in sorted(set(labels) - set(by_stem)):
        problems.add(labels[stem], f"label whose image is missing (no {img_dir}/**/{stem}.*)")
        del labels[stem]
    classes = list(opts.classes) if opts.classes else _read_classes(src)
    parsed: dict[str, list[tuple[str, tuple[float, float, float, float], str]]] = {}
    for stem, lbl in labels.items():
        with problems.check():
            parsed[stem] = _parse(lbl)
    images = [p for p in images if p.stem in parsed or p.stem not in labels]  # a bad label drops its image
    tokens = {tok for rows in parsed.values() for tok, _, _ in rows}
    numeric = {t for t in tokens if t.lstrip("-").isdigit()}
    if numeric and numeric != tokens:
        raise DatasetError(f"{src}: the class field mixes ids and names ({sorted(tokens)[:6]}); use one or the other")
    if classes is None:
        if numeric:
            nc = max(int(t) for t in numeric) + 1
            classes = [f"class{i}" for i in range(nc)]
        else:
            classes = sorted(tokens)
    samples = []
    for img in progress(images, "reading labels"):
        with problems.check():
            samples.append(_sample(img, img_dir, parsed.get(img.stem, []), numeric, classes))
    ds = SourceDataset(format="pixel-boxes", source=src, classes=classes, samples=samples)
    if (src / "splits").exists():
        ds.default_splits = src / "splits"
    return ds


def _sample(img: Path, img_dir: Path, rows: list[tuple[str, tuple[float, float, float, float], str]],
            numeric: set[str], classes: list[str]) -> Sample:
    """One image with its parsed label rows checked against the classes and the image size."""
    w, h = image_size(img)
    boxes: list[Box] = []
    for tok, (x1, y1, x2, y2), where in rows:
        if tok in numeric:
            cls = int(tok)
            if not 0 <= cls < len(classes):
                hint = (" (class ids start at 0: line 1 of classes.txt is id 0; these labels look 1-based)"
                        if cls == len(classes) else " (class ids start at 0)")
                raise DatasetError(f"{where}: class id {cls} is not one of the {len(classes)} classes "
                                   f"{classes}{hint}")
        elif tok in classes:
            cls = classes.index(tok)
        else:
            raise DatasetError(f"{where}: unknown class {tok!r} (classes: {classes})")
        if max(x1, y1, x2, y2) <= 1.0 and max(w, h) > 2:
            raise DatasetError(f"{where}: coordinates ({x1:g}, {y1:g}, {x2:g}, {y2:g}) look normalised (0-1); "
                               f"this format takes pixels (normalised YOLO labels: the `yolo` format)")
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"{where}: x2 < x1 or y2 < y1 in ({x1:g}, {y1:g}, {x2:g}, {y2:g}); expected "
                               f"corners `x1 y1 x2 y2` (is it `x y width height`?)")
        b = make_box(cls, x1, y1, x2, y2, w, h, where)
        if b is not None:
            boxes.append(b)
    rel = img.relative_to(img_dir)
    split = rel.parts[0] if len(rel.parts) > 1 and rel.parts[0] in SPLITS else None
    return Sample(key=img.stem, name=img.stem, image=img, width=w, height=h, boxes=boxes, source_split=split)
