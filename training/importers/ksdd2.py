"""KolektorSDD2 (published layout): train/NNNNN.png + train/NNNNN_GT.png, same under test/; class `defect`.

The published test set stays test; val is carved out of train (seeded, stratified) unless --resplit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import IMAGE_EXTS, DatasetError, SourceDataset, find_image, progress
from training.importers._masks import mask_sample

if TYPE_CHECKING:
    from training.importers import ImportOptions

GT_SUFFIX = "_GT"


def scan(src: Path, opts: ImportOptions) -> SourceDataset:
    classes = list(opts.classes) if opts.classes else ["defect"]
    if len(classes) != 1:
        raise DatasetError(f"ksdd2 has a single class; got --classes {','.join(classes)}")
    found = [sp for sp in ("train", "test") if (src / sp).is_dir()]
    if not found:
        raise DatasetError(f"{src}: no train/ or test/ folder (is this KolektorSDD2?)")
    todo: list[tuple[str, Path, Path]] = []
    for sp in found:
        d = src / sp
        for p in sorted(x for x in d.iterdir() if x.is_file() and x.suffix.lower() in IMAGE_EXTS):
            if p.stem.endswith(GT_SUFFIX):
                if find_image(d, p.stem[: -len(GT_SUFFIX)]) is None:
                    raise DatasetError(f"{p}: mask whose image ({p.stem[: -len(GT_SUFFIX)]}.*) is missing")
                continue
            mask = find_image(d, p.stem + GT_SUFFIX)
            if mask is None:
                raise DatasetError(f"{p}: image without its mask {p.stem}{GT_SUFFIX}.png")
            todo.append((sp, p, mask))
    samples = [
        mask_sample(f"{sp}/{img.stem}", f"{sp}_{img.stem}", img, mask, 0, opts.min_area, source_split=sp)
        for sp, img, mask in progress(todo, "reading masks")
    ]
    return SourceDataset(
        format="ksdd2",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=True,
        notes=[f"boxes = connected components of mask > 0 with >= {opts.min_area} px"],
    )
