"""Small helpers shared by the notebooks in this folder: where things are, small subsets of the shared
datasets (symlinked, never copied), and box drawing. Not part of the installed package."""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

import cv2
import numpy as np

SPLITS = ("train", "val", "test")


def repo_root(start: Path | None = None) -> Path:
    """The checkout this notebook lives in (the first parent with pyproject.toml); put first on sys.path
    so the notebook runs this checkout's code, not another one the venv's editable install points at."""
    here = (start or Path.cwd()).resolve()
    root = next(p for p in (here, *here.parents) if (p / "pyproject.toml").is_file())
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return root


def default_datasets(root: Path) -> Path:
    """The project's usual place for the shared datasets: ../shared/datasets beside the checkout."""
    return root.parent / "shared" / "datasets"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if not dst.exists():
        dst.symlink_to(src.resolve())


def neu_subset(src: Path, dst: Path, per_class: int) -> Path:
    """NEU-DET with the first `per_class` images of each class in each split (images and XML symlinked,
    split files filtered), laid out like the release so the project's importer reads it unchanged."""
    for split in SPLITS:
        ids = (src / "splits" / f"{split}.txt").read_text().split()
        keep: list[str] = []
        for cls in sorted({i.rsplit("_", 1)[0] for i in ids}):
            keep += [i for i in ids if i.rsplit("_", 1)[0] == cls][:per_class]
        for i in keep:
            _link(src / "IMAGES" / f"{i}.jpg", dst / "IMAGES" / f"{i}.jpg")
            _link(src / "ANNOTATIONS" / f"{i}.xml", dst / "ANNOTATIONS" / f"{i}.xml")
        (dst / "splits").mkdir(parents=True, exist_ok=True)
        (dst / "splits" / f"{split}.txt").write_text("".join(i + "\n" for i in keep))
    return dst


def kolektor_subset(src: Path, dst: Path, items: int) -> Path:
    """KolektorSDD with its first `items` kosNN folders symlinked (no split files: for scanning only)."""
    for d in sorted(p for p in src.iterdir() if p.is_dir() and p.name.startswith("kos"))[:items]:
        _link(d, dst / d.name)
    return dst


def draw_boxes(img: np.ndarray, boxes: Iterable[tuple[float, float, float, float]], labels: Iterable[str],
               color: tuple[int, int, int], thickness: int = 2) -> np.ndarray:
    """A copy of a BGR image with labelled boxes (x1, y1, x2, y2 in pixels)."""
    out = img.copy()
    for (x1, y1, x2, y2), text in zip(boxes, labels, strict=True):
        p1, p2 = (round(x1), round(y1)), (round(x2) - 1, round(y2) - 1)
        cv2.rectangle(out, p1, p2, color, thickness)
        cv2.putText(out, text, (p1[0] + 2, max(p1[1] - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1,
                    cv2.LINE_AA)
    return out


def rgb(img: np.ndarray) -> np.ndarray:
    """BGR (OpenCV) to RGB (matplotlib)."""
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
