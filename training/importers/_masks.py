"""Shared by the mask-annotated formats: a `Sample` whose boxes and polygons come from a mask file."""

from __future__ import annotations

from pathlib import Path

from training.datasets import Sample, image_size, mask_to_instances, read_mask


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
