"""Augmentation for surface defects, shared by `sqis train` and training/standalone_train.py.

Geometry (flips, scale, translate, mosaic) and the value jitter are Ultralytics' own, set by
SURFACE_HYP: Ultralytics moves the boxes with the image. The photometric set (lighting, gamma,
sensor noise, slight blur, JPEG) is torchvision v2 (BSD, maintained with torch, which the training
extra already needs), applied through the slot where Ultralytics would apply Albumentations.
Albumentations is not used: its MIT package is final (2.0.8, pinned to albucore==0.0.24 and
opencv-python-headless next to Ultralytics' opencv-python), its successor is AGPL or commercial;
and where it is installed Ultralytics silently applies its own default list (Blur, MedianBlur,
ToGray, CLAHE at p=0.01), which the trainers here replace, so `--no-augment` means none at all.

Imports nothing else of the project (the standalone trainer runs from a bare checkout); torch,
torchvision and ultralytics are imported only when used.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Geometry/colour for surface defects: strips and parts have no "up", colour carries no class information.
SURFACE_HYP: dict[str, Any] = dict(fliplr=0.5, flipud=0.5, degrees=0.0, shear=0.0, perspective=0.0, hsv_h=0.0,
                                   hsv_s=0.0, hsv_v=0.3, scale=0.5, translate=0.1, mosaic=1.0, mixup=0.0)
# Everything Ultralytics would otherwise do to a training image off (with NoAugment*Trainer below).
NO_AUGMENT_HYP: dict[str, Any] = dict(fliplr=0.0, flipud=0.0, degrees=0.0, shear=0.0, perspective=0.0, hsv_h=0.0,
                                      hsv_s=0.0, hsv_v=0.0, scale=0.0, translate=0.0, mosaic=0.0, mixup=0.0,
                                      cutmix=0.0, copy_paste=0.0)


class RandomCLAHE:
    """CLAHE on the lightness channel (OpenCV; torchvision has none), clip limit drawn from clip_limit."""

    def __init__(self, clip_limit: tuple[float, float] = (1.0, 3.0), grid: int = 8) -> None:
        self.clip_limit, self.grid = clip_limit, grid

    def __call__(self, img: Any) -> Any:  # uint8 CHW tensor, RGB
        import cv2
        import torch

        lo, hi = self.clip_limit
        clahe = cv2.createCLAHE(clipLimit=lo + (hi - lo) * torch.rand(()).item(), tileGridSize=(self.grid, self.grid))
        hwc = img.permute(1, 2, 0).contiguous().numpy()
        lab = cv2.cvtColor(hwc, cv2.COLOR_RGB2LAB)
        lab[..., 0] = clahe.apply(lab[..., 0])
        return torch.from_numpy(cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)).permute(2, 0, 1).contiguous()

    def __repr__(self) -> str:
        return f"RandomCLAHE(clip_limit={self.clip_limit})"


class RandomGamma:
    """Gamma drawn uniformly from gamma (torchvision v2 has adjust_gamma but no random transform)."""

    def __init__(self, gamma: tuple[float, float] = (0.8, 1.2)) -> None:
        self.gamma = gamma

    def __call__(self, img: Any) -> Any:
        import torch
        from torchvision.transforms.v2 import functional as F

        lo, hi = self.gamma
        return F.adjust_gamma(img, lo + (hi - lo) * torch.rand(()).item())

    def __repr__(self) -> str:
        return f"RandomGamma(gamma={self.gamma})"


def surface_augmentations() -> list[Any]:
    """The photometric transforms for metal surfaces, each a torchvision v2 RandomApply on a uint8 RGB CHW tensor.

    No transform that erases or invents defects (no cutout, no strong blur, no elastic warp), and
    none that moves pixels: boxes stay valid by construction.
    """
    from torchvision.transforms import v2

    return [
        v2.RandomApply([RandomCLAHE((1.0, 3.0))], p=0.2),                          # uneven lighting
        v2.RandomApply([v2.ColorJitter(brightness=0.2, contrast=0.2)], p=0.5),   # exposure, lamp ageing
        v2.RandomApply([RandomGamma((0.8, 1.2))], p=0.2),                        # camera response
        v2.RandomApply([v2.GaussianNoise(sigma=0.025)], p=0.2),                  # sensor noise (~6/255)
        v2.RandomApply([v2.GaussianBlur(kernel_size=3, sigma=(0.1, 1.0))], p=0.05),  # slight defocus
        v2.RandomApply([v2.JPEG(quality=(60, 100))], p=0.2),                     # edge-device compression
    ]


class Photometric:
    """An Ultralytics transform (labels dict in, labels dict out) that changes labels['img'] only.

    Takes the place of Ultralytics' Albumentations step (after mosaic/affine, before HSV and flips).
    labels['img'] is BGR uint8 HWC; the transforms get an RGB uint8 CHW tensor.
    """

    def __init__(self, transforms: list[Any] | None = None) -> None:
        from torchvision.transforms import v2

        self.transforms = surface_augmentations() if transforms is None else transforms
        self.compose = v2.Compose(self.transforms)

    def __call__(self, labels: dict[str, Any]) -> dict[str, Any]:
        import numpy as np
        import torch

        im = labels["img"]
        if im.ndim != 3 or im.shape[2] != 3 or im.dtype != np.uint8:
            return labels
        t = torch.from_numpy(np.ascontiguousarray(im[..., ::-1])).permute(2, 0, 1).contiguous()
        out = self.compose(t)
        labels["img"] = np.ascontiguousarray(out.permute(1, 2, 0).numpy()[..., ::-1])
        return labels

    def __repr__(self) -> str:
        return f"Photometric({', '.join(map(repr, self.transforms))})"


def names(transforms: list[Any]) -> list[str]:
    """Short names of a photometric list (for run parameters)."""
    return [type(getattr(t, "transforms", [t])[0]).__name__ for t in transforms]


def swap_albumentations(compose: Any, photometric: Any | None) -> int:
    """Replace every Ultralytics Albumentations step inside compose (nested Composes included) with
    photometric, or remove it when photometric is None. Returns how many were found."""
    from ultralytics.data.augment import Albumentations

    found = 0
    ts = getattr(compose, "transforms", None)
    if not isinstance(ts, list):
        return 0
    for i in reversed(range(len(ts))):
        if isinstance(ts[i], Albumentations):
            found += 1
            if photometric is None:
                del ts[i]
            else:
                ts[i] = photometric
        else:
            found += swap_albumentations(ts[i], photometric)
    return found


class _BuildTransforms:
    """dataset.build_transforms with the Albumentations step swapped (close_mosaic rebuilds through it)."""

    def __init__(self, build: Any, photometric: Any | None) -> None:
        self.build, self.photometric = build, photometric

    def __call__(self, hyp: Any) -> Any:
        compose = self.build(hyp)
        swap_albumentations(compose, self.photometric)
        return compose


def apply_to_dataset(dataset: Any, photometric: Any | None) -> Any:
    """Put photometric (or nothing) where the training dataset's Albumentations step is, now and on rebuilds."""
    if getattr(dataset, "augment", False):
        dataset.build_transforms = _BuildTransforms(dataset.build_transforms, photometric)
        found = swap_albumentations(dataset.transforms, photometric)
        log.info("photometric step set", extra={"photometric": repr(photometric), "replaced_albumentations": found})
    return dataset


def trainer_class(task: str = "detect", augment: bool = True, family: str = "yolov8") -> type:
    """The Ultralytics trainer to pass as model.train(trainer=...): the surface photometric set
    (augment) or no photometric step at all (not even Ultralytics' Albumentations defaults).
    family "rtdetr": RT-DETR's own trainer (its loss, validator and dataset) with the same step."""
    from training import augment_trainers as t

    if family == "rtdetr":
        if task != "detect":
            raise ValueError("RT-DETR detects only (no segment task)")
        return t.SurfaceRTDETRTrainer if augment else t.NoAugmentRTDETRTrainer
    return {("detect", True): t.SurfaceDetectionTrainer, ("detect", False): t.NoAugmentDetectionTrainer,
            ("segment", True): t.SurfaceSegmentationTrainer,
            ("segment", False): t.NoAugmentSegmentationTrainer}[(task, augment)]
