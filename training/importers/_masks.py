"""Shared by the mask-annotated formats: a `Sample` whose boxes and polygons come from a mask file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from training.datasets import (
    IMAGE_EXTS,
    DatasetError,
    Problems,
    Sample,
    find_image,
    image_size,
    mask_to_instances,
    progress,
    read_mask,
)


def mask_sample(
    key: str,
    name: str,
    image: Path,
    mask: Path | None,
    cls: int,
    min_area: int,
    *,
    group: str | None = None,
    source_split: str | None = None,
) -> Sample:
    """Read the image size and the mask (defect where > 0, same size as the image) into a Sample."""
    w, h = image_size(image)
    s = Sample(
        key=key, name=name, image=image, width=w, height=h, mask=mask, group=group, source_split=source_split
    )
    if mask is not None:
        s.boxes, s.polygons = mask_to_instances(read_mask(mask, (w, h)), cls, min_area)
    return s


def pair_images_with_masks(folder: Path, suffix: str, problems: Problems | None = None) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a folder where each image NAME has its mask NAME<suffix>; an image
    without its mask, or a mask without its image, is an error naming the file (recorded in
    ``problems`` when given, and the pair left out)."""
    strict = problems is None
    problems = Problems() if problems is None else problems
    pairs: list[tuple[Path, Path]] = []
    for p in sorted(x for x in folder.iterdir() if x.is_file() and x.suffix.lower() in IMAGE_EXTS):
        with problems.check():
            if p.stem.endswith(suffix):
                if find_image(folder, p.stem[: -len(suffix)]) is None:
                    raise DatasetError(f"{p}: mask whose image ({p.stem[: -len(suffix)]}.*) is missing")
                continue
            mask = find_image(folder, p.stem + suffix)
            if mask is None:
                raise DatasetError(f"{p}: image without its mask {p.stem}{suffix}.png")
            pairs.append((p, mask))
    if strict and problems:  # called without a collector: the first problem stops the import
        raise DatasetError(f"{problems.items[0]['file']}: {problems.items[0]['reason']}")
    return pairs


def read_mask_samples(todo: list[tuple[dict[str, Any], Path, Path | None]], min_area: int,
                      problems: Problems) -> list[Sample]:
    """`mask_sample(**kw, image, mask, min_area)` for each item; a sample whose image or mask cannot be
    read, or does not match, is recorded in ``problems`` and left out."""
    out = []
    for kw, img, mask in progress(todo, "reading masks"):
        with problems.check():
            out.append(mask_sample(image=img, mask=mask, min_area=min_area, **kw))
    return out
