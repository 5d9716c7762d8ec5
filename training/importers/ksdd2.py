"""KolektorSDD2 (published layout): train/NNNNN.png + train/NNNNN_GT.png, same under test/; class `defect`.

The published test set stays test; val is carved out of train (seeded, stratified) unless --resplit.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import DatasetError, Problems, SourceDataset
from training.importers._masks import pair_images_with_masks, read_mask_samples

if TYPE_CHECKING:
    from training.importers import ImportOptions

GT_SUFFIX = "_GT"


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    classes = list(opts.classes) if opts.classes else ["defect"]
    if len(classes) != 1:
        raise DatasetError(f"ksdd2 has a single class; got --classes {','.join(classes)}")
    found = [sp for sp in ("train", "test") if (src / sp).is_dir()]
    if not found:
        raise DatasetError(f"{src}: no train/ or test/ folder (is this KolektorSDD2?)")
    todo: list[tuple[str, Path, Path]] = []
    for sp in found:
        todo += [(sp, img, mask) for img, mask in pair_images_with_masks(src / sp, GT_SUFFIX, problems)]
    samples = read_mask_samples(
        [({"key": f"{sp}/{img.stem}", "name": f"{sp}_{img.stem}", "cls": 0, "source_split": sp}, img, mask)
         for sp, img, mask in todo], opts.min_area, problems)
    return SourceDataset(
        format="ksdd2",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=True,
        notes=[f"boxes = connected components of mask > 0 with >= {opts.min_area} px"],
    )
