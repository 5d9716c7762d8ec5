"""Shared by the mask-annotated formats: a `Sample` whose boxes and polygons come from a mask file."""

from __future__ import annotations

from pathlib import Path

from training.datasets import (
    IMAGE_EXTS,
    DatasetError,
    Sample,
    find_image,
    image_size,
    mask_to_instances,
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


def pair_images_with_masks(folder: Path, suffix: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a folder where each image NAME has its mask NAME<suffix>; an image
    without its mask, or a mask without its image, is an error naming the file."""
    pairs: list[tuple[Path, Path]] = []
    for p in sorted(x for x in folder.iterdir() if x.is_file() and x.suffix.lower() in IMAGE_EXTS):
        if p.stem.endswith(suffix):
            if find_image(folder, p.stem[: -len(suffix)]) is None:
                raise DatasetError(f"{p}: mask whose image ({p.stem[: -len(suffix)]}.*) is missing")
            continue
        mask = find_image(folder, p.stem + suffix)
        if mask is None:
            raise DatasetError(f"{p}: image without its mask {p.stem}{suffix}.png")
        pairs.append((p, mask))
    return pairs
