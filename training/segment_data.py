"""The YOLOv8-seg view of an imported dataset: images linked, labels taken from labels-seg/ (polygons).

Ultralytics finds an image's label by replacing /images/ with /labels/ in its path, so `--task segment`
trains on a small directory whose images/ are symlinks to the dataset's and whose labels/ are copies of
its labels-seg/ (the importer writes one polygon per connected mask component there).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from training.errors import TrainingError

__all__ = ["segment_data_view"]

SPLITS = ("train", "val", "test")


def segment_data_view(data_yaml: Path, work: Path) -> Path:
    """Build the view under ``work`` and return its data.yaml (TrainingError when the dataset has no polygons)."""
    import yaml

    from training.datasets import IMAGE_EXTS

    cfg: dict[str, Any] = yaml.safe_load(data_yaml.read_text()) or {}
    root = Path(cfg.get("path") or data_yaml.parent)
    seg_root = root / "labels-seg"
    if not seg_root.is_dir():
        raise TrainingError(f"{root}: no labels-seg/ (polygons); --task segment needs a mask-annotated import "
                        "(kolektor, ksdd2, mvtec-ad, or a YOLO-seg dataset)")
    work.mkdir(parents=True, exist_ok=True)
    out_cfg = {k: v for k, v in cfg.items() if k not in SPLITS}
    out_cfg["path"] = str(work.resolve())
    for split in SPLITS:
        entry = cfg.get(split)
        if not entry:
            continue
        src_dir = Path(entry) if Path(entry).is_absolute() else root / entry
        if not src_dir.is_dir():
            raise TrainingError(f"{data_yaml}: split {split} is not a directory ({src_dir})")
        img_out, lbl_out = work / "images" / split, work / "labels" / split
        img_out.mkdir(parents=True, exist_ok=True)
        lbl_out.mkdir(parents=True, exist_ok=True)
        for img in sorted(src_dir.iterdir()):
            if img.suffix.lower() not in IMAGE_EXTS:
                continue
            link = img_out / img.name
            if not link.exists():
                link.symlink_to(img.resolve())
            lbl = seg_root / split / f"{img.stem}.txt"
            if lbl.is_file():
                shutil.copyfile(lbl, lbl_out / lbl.name)
        out_cfg[split] = f"images/{split}"
    out = work / "data.yaml"
    out.write_text(yaml.safe_dump(out_cfg, sort_keys=False))
    return out
