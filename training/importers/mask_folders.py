"""Plain "image + same-stem mask" folders, one per class (what many plants export, and Magnetic Tile's
layout): SRC/<class>/.../STEM.jpg with its mask STEM.png (or STEM_mask.*) beside it, or
SRC/<class>/images/STEM.* with SRC/<class>/masks/STEM.* (or STEM_mask.*).

A class folder named good, ok, free or normal (or ending in _good / _free, like MT_Free) holds
defect-free images: a mask there is optional and must be empty. Boxes are the mask components
(--min-area). Every invalid sample is recorded in ``problems``.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.datasets import IMAGE_EXTS, DatasetError, Problems, SourceDataset, progress, read_mask
from training.importers._masks import mask_sample

if TYPE_CHECKING:
    from training.importers import ImportOptions

GOOD_NAMES = {"good", "ok", "free", "normal", "defect_free", "defect-free"}
MASK_SUFFIX = "_mask"


def is_good(name: str) -> bool:
    n = name.lower()
    return n in GOOD_NAMES or n.endswith(("_good", "_free", "-good", "-free"))


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def _pairs_side_by_side(d: Path, problems: Problems) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) where masks sit beside their images: STEM.png next to STEM.jpg, or STEM_mask.*."""
    groups: dict[tuple[Path, str], list[Path]] = defaultdict(list)
    for p in _images(d):
        groups[(p.parent, p.stem)].append(p)
    out: list[tuple[Path, Path | None]] = []
    for (parent, stem), files in sorted(groups.items()):
        if stem.endswith(MASK_SUFFIX) and len(files) == 1:
            if (parent, stem.removesuffix(MASK_SUFFIX)) not in groups:
                problems.add(files[0], f"mask whose image ({stem.removesuffix(MASK_SUFFIX)}.*) is missing")
            continue
        suffixed = groups.get((parent, stem + MASK_SUFFIX))
        if len(files) == 1:
            out.append((files[0], suffixed[0] if suffixed else None))
            continue
        pngs = [f for f in files if f.suffix.lower() == ".png"]
        others = [f for f in files if f.suffix.lower() != ".png"]
        if len(files) != 2 or len(pngs) != 1 or suffixed:
            problems.add(files[0], f"{len(files)} files named {stem}.* here: cannot tell the image from its mask "
                                   f"(name the mask {stem}.png beside a non-PNG image, or {stem}{MASK_SUFFIX}.png)")
            continue
        out.append((others[0], pngs[0]))
    return out


def _pairs_subfolders(d: Path, problems: Problems) -> list[tuple[Path, Path | None]]:
    """(image, mask or None) for d/images/STEM.* with d/masks/STEM.* (or STEM_mask.*)."""
    masks: dict[str, Path] = {}
    for m in _images(d / "masks"):
        rel = m.relative_to(d / "masks").with_suffix("").as_posix()
        masks[rel.removesuffix(MASK_SUFFIX) if rel.endswith(MASK_SUFFIX) else rel] = m
    out: list[tuple[Path, Path | None]] = []
    for img in _images(d / "images"):
        out.append((img, masks.pop(img.relative_to(d / "images").with_suffix("").as_posix(), None)))
    for rel, m in sorted(masks.items()):
        problems.add(m, f"mask whose image images/{rel}.* is missing")
    return out


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    dirs = sorted(d for d in src.iterdir() if d.is_dir() and d.name != "splits" and not d.name.startswith("."))
    if not dirs:
        raise DatasetError(f"{src}: no class folders (expected SRC/<class>/ with images and same-stem masks)")
    types = [d.name for d in dirs if not is_good(d.name)]
    if opts.single_class:
        classes = ["defect"]
    elif opts.classes:
        classes = list(opts.classes)
        unknown = [t for t in types if t not in classes]
        if unknown:
            raise DatasetError(f"{src / unknown[0]}: unknown class {unknown[0]!r} (known: {', '.join(classes)})")
    else:
        classes = types
    todo: list[tuple[dict[str, Any], Path, Path | None, bool]] = []
    for d in dirs:
        split_dirs = (d / "images").is_dir() and (d / "masks").is_dir()
        pairs = _pairs_subfolders(d, problems) if split_dirs else _pairs_side_by_side(d, problems)
        good = is_good(d.name)
        for img, mask in pairs:
            rel = img.relative_to(d / "images" if split_dirs else d).with_suffix("").as_posix()
            if mask is None and not good:
                problems.add(img, f"defect image without its mask ({img.stem}.png or {img.stem}{MASK_SUFFIX}.png)")
                continue
            cls = 0 if good or opts.single_class else classes.index(d.name)
            kw = {"key": f"{d.name}/{rel}", "name": f"{d.name}_{rel.replace('/', '_')}", "cls": cls}
            todo.append((kw, img, mask, good))
    samples = []
    for kw, img, mask, good in progress(todo, "reading masks"):
        with problems.check():
            if good:
                s = mask_sample(image=img, mask=None, min_area=opts.min_area, **kw)
                if mask is not None and read_mask(mask, (s.width, s.height)).any():
                    raise DatasetError(f"{mask}: defect pixels in the mask of a defect-free class")
            else:
                s = mask_sample(image=img, mask=mask, min_area=opts.min_area, **kw)
                if not s.boxes:  # only specks: keep them rather than lose the defect
                    s = mask_sample(image=img, mask=mask, min_area=1, **kw)
                    if not s.boxes:
                        raise DatasetError(f"{mask}: empty mask for a defect image")
            samples.append(s)
    ds = SourceDataset(
        format="mask-folders",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=True,
        notes=[f"boxes = connected components of mask > 0 with >= {opts.min_area} px"],
    )
    if (src / "splits").is_dir():
        ds.default_splits = src / "splits"
    return ds
