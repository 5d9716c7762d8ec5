"""KolektorSDD: kosNN/PartK.jpg + kosNN/PartK_label.<png|bmp> (defect where mask > 0), class `defect`.

Every Part of one item (kosNN) stays in one split; SRC/splits ("kosNN/PartK" per line) is used if present.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import DatasetError, Problems, SourceDataset
from training.importers._masks import pair_images_with_masks, read_mask_samples

if TYPE_CHECKING:
    from training.importers import ImportOptions

LABEL_SUFFIX = "_label"


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    problems = Problems() if problems is None else problems
    classes = list(opts.classes) if opts.classes else ["defect"]
    if len(classes) != 1:
        raise DatasetError(f"kolektor has a single class; got --classes {','.join(classes)}")
    items = sorted(d for d in src.iterdir() if d.is_dir() and d.name != "splits")
    pairs: list[tuple[Path, Path, Path | None]] = []
    for d in items:
        pairs += [(d, img, mask) for img, mask in pair_images_with_masks(d, LABEL_SUFFIX, problems)]
    if not pairs and not problems:
        raise DatasetError(f"{src}: no kosNN/PartK.jpg images found (is this KolektorSDD?)")
    samples = read_mask_samples(
        [({"key": f"{d.name}/{img.stem}", "name": f"{d.name}_{img.stem}", "cls": 0, "group": d.name}, img, mask)
         for d, img, mask in pairs], opts.min_area, problems)
    ds = SourceDataset(
        format="kolektor",
        source=src,
        classes=classes,
        samples=samples,
        has_masks=True,
        notes=[f"boxes = connected components of mask > 0 with >= {opts.min_area} px"],
    )
    if (src / "splits").is_dir():
        ds.default_splits = src / "splits"
    return ds
