"""Importers: one module per source format, each exposing `scan(src, opts) -> SourceDataset`.

Each importer also takes `problems` and records every invalid sample there instead of stopping, so one
pass reports them all (a scan without that argument, e.g. a plug-in's, stops at its first problem).
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

from training.datasets import DatasetCard, DatasetError, Problems, SourceDataset, write_dataset

log = logging.getLogger(__name__)

# format name -> module under training.importers
FORMATS: dict[str, str] = {
    "neu-det": "neu_det",
    "kolektor": "kolektor",
    "ksdd2": "ksdd2",
    "mvtec-ad": "mvtec_ad",
    "dagm": "dagm",
    "voc": "voc",
    "yolo": "yolo",
    "coco": "coco",
    "pixel-boxes": "pixel_boxes",
    "mask-folders": "mask_folders",
}


@dataclass(frozen=True)
class ImportOptions:
    """Format-specific knobs; each importer reads the ones it understands."""

    classes: tuple[str, ...] | None = None  # fixed class list: other names are an error
    single_class: bool = False  # mvtec-ad / dagm: one class `defect` instead of one per defect type
    min_area: int = 10  # mask importers: connected components smaller than this (px) are ignored
    skip_invalid: bool = False  # import the valid samples, list the dropped ones (default: refuse them all)


def scan(fmt: str, src: Path, opts: ImportOptions | None = None) -> SourceDataset:
    """Scan a source dataset of format `fmt` (validating it) without writing anything."""
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {fmt!r} (known: {', '.join(FORMATS)})")
    src = Path(src)
    if not src.is_dir():
        raise DatasetError(f"{src}: source directory does not exist")
    opts = opts or ImportOptions()
    module = importlib.import_module(f"training.importers.{FORMATS[fmt]}")
    if len(inspect.signature(module.scan).parameters) < 3:
        return module.scan(src, opts)  # type: ignore[no-any-return]
    problems = Problems()
    ds: SourceDataset = module.scan(src, opts, problems)
    if problems and not opts.skip_invalid:
        raise DatasetError(problems.report(src))
    ds.skipped = problems.items
    if problems:
        log.warning("skipped invalid samples", extra={"format": fmt, "src": str(src), "skipped": len(problems)})
    return ds


def import_dataset(
    fmt: str,
    src: Path,
    out: Path,
    *,
    splits: Path | None = None,
    seed: int = 0,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
    resplit: bool = False,
    force: bool = False,
    opts: ImportOptions | None = None,
) -> DatasetCard:
    """Scan `src` as `fmt` and write it to `out` in the internal format; returns the dataset card."""
    ds = scan(fmt, src, opts)
    log.info("scanned source", extra={"format": fmt, "src": str(src), "images": len(ds.samples)})
    return write_dataset(
        ds,
        Path(out),
        splits=splits,
        seed=seed,
        val_frac=val_frac,
        test_frac=test_frac,
        resplit=resplit,
        force=force,
    )
