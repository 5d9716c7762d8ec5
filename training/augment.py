"""Augmentation for surface defects, shared by `sqis train` and training/standalone_train.py.

Imports nothing else of the project (the standalone trainer runs from a bare checkout).
"""

from __future__ import annotations

from typing import Any

# Geometry/colour for surface defects: strips and parts have no "up", colour carries no class information.
SURFACE_HYP: dict[str, Any] = dict(fliplr=0.5, flipud=0.5, degrees=0.0, shear=0.0, perspective=0.0, hsv_h=0.0,
                                   hsv_s=0.0, hsv_v=0.3, scale=0.5, translate=0.1, mosaic=1.0, mixup=0.0)


def surface_augmentations() -> list[Any]:
    """Photometric Albumentations for metal surfaces (lighting, sensor noise, slight blur, JPEG).

    No transform that erases or invents defects (no cutout, no strong blur, no elastic warp);
    geometry (flips, scale, translate, mosaic) stays with Ultralytics so boxes follow.
    """
    import albumentations as A

    return [
        A.CLAHE(clip_limit=(1, 3), p=0.2),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.RandomGamma(gamma_limit=(80, 120), p=0.2),
        A.GaussNoise(std_range=(0.01, 0.04), p=0.2),
        A.Blur(blur_limit=3, p=0.05),
        A.ImageCompression(quality_range=(60, 100), p=0.2),
    ]
