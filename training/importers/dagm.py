"""DAGM 2007: ClassN/{Train,Test}/*.PNG with ClassN/{Train,Test}/Label/Labels.txt and Label/*_label.PNG.

Labels.txt lines: `index flag filename 0 [a b angle cx cy | label-file]` (flag 1 = defective); the
weak ellipse label (semi-axes a, b, rotation angle in radians, centre x, y) becomes the box; without
ellipse parameters the box comes from the *_label.PNG mask. Classes: class1..class10 (or `defect`).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import (
    DatasetError,
    Problems,
    Sample,
    SourceDataset,
    ellipse_to_box,
    find_image,
    image_size,
    make_box,
    mask_to_instances,
    progress,
    read_mask,
)

if TYPE_CHECKING:
    from training.importers import ImportOptions

SPLIT_DIRS = {"train": "train", "test": "test"}


def _class_dirs(src: Path) -> list[Path]:
    if any((src / d).is_dir() for d in ("Train", "Test")):
        return [src]  # one ClassN folder given directly
    dirs = sorted(
        (d for d in src.iterdir() if d.is_dir() and re.fullmatch(r"class\d+(_def)?", d.name, re.I)),
        key=lambda d: int(re.sub(r"\D", "", d.name)),
    )
    if not dirs:
        raise DatasetError(f"{src}: no ClassN/ folders (is this DAGM 2007?)")
    return dirs


def _split_dirs(cdir: Path) -> list[tuple[str, Path]]:
    out = []
    for d in sorted(cdir.iterdir()):
        if d.is_dir() and d.name.lower() in SPLIT_DIRS:
            out.append((SPLIT_DIRS[d.name.lower()], d))
    if not out:
        raise DatasetError(f"{cdir}: no Train/ or Test/ folder")
    return out


def _parse_labels(path: Path) -> dict[str, tuple[bool, list[str]]]:
    """filename -> (defective, extra fields after the 4th column) from a Labels.txt."""
    out: dict[str, tuple[bool, list[str]]] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts or (len(parts) == 1 and parts[0].isdigit()):  # blank line or the count header
            continue
        if len(parts) < 3 or parts[1] not in ("0", "1"):
            raise DatasetError(f"{path}:{n}: expected `index flag filename 0 ...`, got {line.strip()!r}")
        out[parts[2]] = (parts[1] == "1", parts[4:])
    return out


def _ellipse(fields: list[str], where: str) -> tuple[float, float, float, float, float] | None:
    nums = []
    for f in fields:
        try:
            nums.append(float(f))
        except ValueError:
            return None
    if len(nums) < 5:
        return None
    a, b, angle, cx, cy = nums[:5]
    if abs(angle) > 2 * math.pi:  # given in degrees
        angle = math.radians(angle)
    if a <= 0 or b <= 0:
        raise DatasetError(f"{where}: ellipse with non-positive semi-axes ({a}, {b})")
    return a, b, angle, cx, cy


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    cdirs = _class_dirs(src)
    names = [re.sub(r"_def$", "", d.name, flags=re.I).lower() for d in cdirs]
    classes = ["defect"] if opts.single_class else (list(opts.classes) if opts.classes else names)
    if not opts.single_class and opts.classes:
        unknown = [n for n in names if n not in classes]
        if unknown:
            raise DatasetError(
                f"{src / unknown[0]}: unknown class {unknown[0]!r} (known: {', '.join(classes)})"
            )
    todo: list[tuple[int, str, Path, Path, Path]] = []
    for cdir, cname in zip(cdirs, names, strict=True):
        cls = 0 if opts.single_class else classes.index(cname)
        for split, sdir in _split_dirs(cdir):
            images = sorted(p for p in sdir.iterdir() if p.is_file() and p.suffix.lower() == ".png")
            label_dir = sdir / "Label"
            if not label_dir.is_dir():
                raise DatasetError(f"{sdir}: no Label/ folder with Labels.txt")
            for p in sorted(label_dir.iterdir()):
                if p.suffix.lower() == ".png" and p.stem.lower().endswith("_label"):
                    if find_image(sdir, p.stem[: -len("_label")]) is None:
                        problems.add(p, f"mask whose image is missing from {sdir}")
            for img in images:
                todo.append((cls, split, img, sdir, label_dir))
    labels_cache: dict[Path, dict[str, tuple[bool, list[str]]]] = {}
    samples = []
    for cls, split, img, sdir, label_dir in progress(todo, "reading labels"):
        with problems.check():
            lf = label_dir / "Labels.txt"
            if label_dir not in labels_cache:
                labels_cache[label_dir] = _parse_labels(lf) if lf.is_file() else {}
            table = labels_cache[label_dir]
            cdir = sdir.parent.name
            w, h = image_size(img)
            s = Sample(
                key=f"{cdir}/{sdir.name}/{img.stem}",
                name=f"{cdir}_{sdir.name}_{img.stem}",
                image=img,
                width=w,
                height=h,
                source_split=split,
            )
            mask = find_image(label_dir, f"{img.stem}_label")
            defective, extra = table.get(img.name, (mask is not None, []))
            if not defective:
                samples.append(s)
                continue
            s.mask = mask
            ell = _ellipse(extra, f"{lf} ({img.name})")
            if ell is not None:
                b = make_box(cls, *_ellipse_box(ell, w, h, f"{lf} ({img.name})"), w, h, f"{lf} ({img.name})")
                if b is not None:
                    s.boxes = [b]
                if mask is not None:
                    s.polygons = mask_to_instances(read_mask(mask, (w, h)), cls, opts.min_area)[1]
            elif mask is not None:
                s.boxes, s.polygons = mask_to_instances(read_mask(mask, (w, h)), cls, opts.min_area)
            else:
                raise DatasetError(
                    f"{lf}: {img.name} is flagged defective but has no ellipse and no {img.stem}_label.PNG"
                )
            samples.append(s)
    has_masks = any(s.mask is not None for s in samples)
    return SourceDataset(
        format="dagm",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=has_masks,
        notes=["boxes from the weak ellipse labels (bounding box of the ellipse, clipped)"],
    )


def _ellipse_box(
    ell: tuple[float, float, float, float, float], w: int, h: int, where: str
) -> tuple[float, ...]:
    """Box of a weak ellipse: its centre must lie inside the image; parts past the border are clipped."""
    cx, cy = ell[3], ell[4]
    if not (0 <= cx <= w and 0 <= cy <= h):
        raise DatasetError(f"{where}: ellipse centre ({cx:g}, {cy:g}) lies outside the {w}x{h} image")
    x1, y1, x2, y2 = ellipse_to_box(*ell)
    return max(0.0, x1), max(0.0, y1), min(float(w), x2), min(float(h), y2)
