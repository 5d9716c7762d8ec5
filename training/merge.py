"""`sqis data merge`: a base dataset + reviewed frames (`sqis data export-reviewed`) -> a new dataset.

Both inputs are datasets in the internal format. Reviewed frames whose bytes are already in the base,
or repeat one another, are dropped (content hash); the rest go to train and val only, so the base's
test split stays frozen and results on it remain comparable across versions. Base samples keep their
split. Classes are matched by name (new names from the reviews are appended); boxes and polygons are
kept, masks are not (reviewed frames have none).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from training.datasets import (
    DatasetCard,
    DatasetError,
    Sample,
    SourceDataset,
    _file_digest,
    stratified_split,
    write_dataset,
)

log = logging.getLogger(__name__)

REVIEWED_PREFIX = "reviewed_"


def _scan(root: Path, what: str) -> SourceDataset:
    from training.importers import scan
    from training.importers.yolo import _read_label

    if not (root / "data.yaml").is_file():
        raise DatasetError(f"{root}: {what} is not a dataset in the internal format (no data.yaml)")
    ds = scan("yolo", root)
    for s in ds.samples:  # polygons live in labels-seg/ in the internal format
        seg = root / "labels-seg" / str(s.source_split) / f"{s.image.stem}.txt"
        if seg.is_file():
            s.polygons = _read_label(seg, s.image, len(ds.classes))[1]
    return ds


def merge_reviewed(base: Path, reviewed: Path, out: Path, *, seed: int = 0, val_frac: float = 0.15,
                   force: bool = False) -> tuple[DatasetCard, dict[str, Any]]:
    """Write base + reviewed to OUT; returns the card and what happened to the reviewed frames."""
    base, reviewed = Path(base), Path(reviewed)
    b = _scan(base, "BASE")
    r = _scan(reviewed, "REVIEWED")
    classes = list(b.classes) + [c for c in r.classes if c not in b.classes]
    remap = {i: classes.index(c) for i, c in enumerate(r.classes)}
    seen = {_file_digest(s.image) for s in b.samples}
    kept: list[Sample] = []
    duplicates = 0
    for s in r.samples:
        d = _file_digest(s.image)
        if d in seen:
            duplicates += 1
            continue
        seen.add(d)
        kept.append(replace(s, key=f"reviewed/{s.key}", name=f"{REVIEWED_PREFIX}{s.name}",
                            boxes=[replace(x, cls=remap[x.cls]) for x in s.boxes],
                            polygons=[(remap[c], p) for c, p in s.polygons], mask=None, group=None))
    split = stratified_split({s.name: [s] for s in kept}, {"val": val_frac}, seed)
    for s in kept:
        s.source_split = split[s.name]  # train or val: never the frozen test split
    stats = {"reviewed": len(r.samples), "added": len(kept), "duplicates_dropped": duplicates,
             "added_to_val": sum(s.source_split == "val" for s in kept),
             "new_classes": [c for c in r.classes if c not in b.classes]}
    notes = [f"merged: {len(b.samples)} images of {base.resolve()} (splits kept) + {len(kept)} reviewed frames "
             f"of {reviewed.resolve()} (train/val only, seeded {seed}); {duplicates} reviewed frame(s) already "
             "present (same bytes) dropped"]
    if any(s.mask is not None for s in b.samples) or (base / "masks").is_dir():
        notes.append("the base's masks are not carried over (reviewed frames have none); boxes and polygons are")
    ds = SourceDataset(format="merge", source=base.resolve(), classes=classes,
                       samples=[replace(s, mask=None) for s in b.samples] + kept, notes=notes)
    card = write_dataset(ds, out, seed=seed, val_frac=val_frac, force=force)
    log.info("datasets merged", extra={"out": str(out), **{k: v for k, v in stats.items() if k != "new_classes"}})
    return card, stats
