"""The fixed image sample a parity check runs on, and whether its result blocks registration.

Shared by the detector's and the segmenter's export paths (training/train.py, training/segment_export.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.export import ParityReport

GOLDEN_IMAGES = 16


def _data_cfg(data_yaml: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(data_yaml.read_text()) or {}


def find_val_images(data_yaml: Path, split: str = "val") -> list[Path]:
    """Image files of a split of a YOLO data.yaml (a directory or a .txt list), sorted."""
    from training.datasets import IMAGE_EXTS

    cfg = _data_cfg(data_yaml)
    root = Path(cfg.get("path") or data_yaml.parent)
    entry = cfg.get(split)
    if not entry:
        return []
    entries = entry if isinstance(entry, list) else [entry]
    out: list[Path] = []
    for e in entries:
        p = Path(e) if Path(e).is_absolute() else root / e
        if p.is_dir():
            out += [f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXTS]
        elif p.suffix == ".txt" and p.is_file():
            out += [Path(x) if Path(x).is_absolute() else root / x for x in p.read_text().split() if x]
    return sorted(out)


def golden_images(data_yaml: Path, n: int = GOLDEN_IMAGES) -> list[Path]:
    """A fixed, spread-out sample of the val split (else test, else train) for the parity check."""
    imgs: list[Path] = []
    for split in ("val", "test", "train"):
        imgs = find_val_images(data_yaml, split)
        if imgs:
            break
    if len(imgs) <= n:
        return imgs
    step = len(imgs) / n
    return [imgs[int(i * step)] for i in range(n)]


def parity_blocks_registration(parity: ParityReport | None, allow_unverified: bool = False) -> bool:
    """True when the parity result forbids registering: failed, or unverified without allow_unverified."""
    if parity is None or parity.passed:
        return False
    return not (parity.status == "unverified" and allow_unverified)
