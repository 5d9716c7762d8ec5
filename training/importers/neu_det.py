"""NEU-DET (NEU surface defect database, detection): ANNOTATIONS/*.xml (Pascal VOC) + IMAGES/*.jpg.

Quirks of the release: some XML <filename> fields lack the `.jpg`; <size> says depth 1 for 3-channel
JPEGs (the image itself is trusted); byte-identical images exist (patches_101 / patches_105).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from training.datasets import Problems, SourceDataset
from training.importers.voc import scan_voc

if TYPE_CHECKING:
    from training.importers import ImportOptions

CLASSES = ["crazing", "inclusion", "patches", "pitted_surface", "rolled-in_scale", "scratches"]


def scan(src: Path, opts: ImportOptions, problems: Problems | None = None) -> SourceDataset:
    ds = scan_voc(src, "neu-det", list(opts.classes) if opts.classes else CLASSES, problems=problems)
    if (src / "splits").is_dir():
        ds.default_splits = src / "splits"
    return ds
