"""MVTec AD, one category: train/good/*.png, test/<type>/*.png, ground_truth/<type>/<stem>_mask.png.

Classes are the defect types (or `defect` with --single-class). The published train split holds only
good images, so all images are pooled and split seeded/stratified. Every invalid sample (a defect image
without its mask, an empty or unreadable mask, a mask without its image) is recorded in ``problems``.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import IMAGE_EXTS, DatasetError, Problems, SourceDataset, find_image, progress
from training.importers._masks import mask_sample

if TYPE_CHECKING:
    from training.importers import ImportOptions

GOOD = "good"


def _images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    if not (src / "train").is_dir() or not (src / "test").is_dir():
        raise DatasetError(f"{src}: expected one MVTec AD category folder with train/ and test/")
    gt = src / "ground_truth"
    types = sorted(d.name for d in (src / "test").iterdir() if d.is_dir() and d.name != GOOD)
    if opts.single_class:
        classes = ["defect"]
    elif opts.classes:
        classes = list(opts.classes)
        unknown = [t for t in types if t not in classes]
        if unknown:
            raise DatasetError(
                f"{src / 'test' / unknown[0]}: unknown class {unknown[0]!r} (known: {', '.join(classes)})"
            )
    else:
        classes = types
    todo: list[tuple[str, str, Path, Path | None, int]] = []
    for split in ("train", "test"):
        for d in sorted(x for x in (src / split).iterdir() if x.is_dir()):
            for img in _images(d):
                key = f"{split}/{d.name}/{img.stem}"
                if d.name == GOOD:
                    todo.append((key, f"{split}_{d.name}_{img.stem}", img, None, -1))
                    continue
                if split == "train":
                    problems.add(img, "MVTec AD train/ may hold only good/ images")
                    continue
                mask = find_image(gt / d.name, f"{img.stem}_mask")
                if mask is None:
                    problems.add(img, f"defect image without its mask ground_truth/{d.name}/{img.stem}_mask.png")
                    continue
                cls = 0 if opts.single_class else classes.index(d.name)
                todo.append((key, f"{split}_{d.name}_{img.stem}", img, mask, cls))
    if gt.is_dir():  # a mask whose image is missing
        for d in sorted(x for x in gt.iterdir() if x.is_dir()):
            for m in _images(d):
                stem = m.stem.removesuffix("_mask")
                if find_image(src / "test" / d.name, stem) is None:
                    problems.add(m, f"mask whose image test/{d.name}/{stem}.png is missing")
    samples = []
    for key, name, img, mask, cls in progress(todo, "reading masks"):
        with problems.check():
            s = mask_sample(key, name, img, mask, max(cls, 0), opts.min_area)
            if mask is not None and not s.boxes:  # only specks: keep them rather than lose the defect
                s = mask_sample(key, name, img, mask, max(cls, 0), 1)
                if not s.boxes:
                    raise DatasetError(f"{mask}: empty mask for a defect image")
            samples.append(s)
    return SourceDataset(
        format="mvtec-ad",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=True,
        notes=["train/ holds only good images: all images pooled and split seeded/stratified"],
    )
