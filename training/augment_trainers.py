"""Ultralytics trainers whose training dataset uses training.augment's photometric step (or none).

Module-level classes (not built in a function) so Ultralytics' multi-GPU launcher can import them.
Imports ultralytics at import time: import it only where training runs (training.augment.trainer_class).
"""

from __future__ import annotations

from typing import Any

from ultralytics.models.rtdetr.train import RTDETRTrainer
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.models.yolo.segment import SegmentationTrainer

from training.augment import Photometric, apply_to_dataset


class _Surface:
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        ds = super().build_dataset(img_path, mode, batch)  # type: ignore[misc]
        return apply_to_dataset(ds, Photometric()) if mode == "train" else ds


class _NoAugment:
    def build_dataset(self, img_path: str, mode: str = "train", batch: int | None = None) -> Any:
        ds = super().build_dataset(img_path, mode, batch)  # type: ignore[misc]
        return apply_to_dataset(ds, None) if mode == "train" else ds


class SurfaceDetectionTrainer(_Surface, DetectionTrainer):
    pass


class NoAugmentDetectionTrainer(_NoAugment, DetectionTrainer):
    pass


class SurfaceSegmentationTrainer(_Surface, SegmentationTrainer):
    pass


class NoAugmentSegmentationTrainer(_NoAugment, SegmentationTrainer):
    pass


class SurfaceRTDETRTrainer(_Surface, RTDETRTrainer):
    pass


class NoAugmentRTDETRTrainer(_NoAugment, RTDETRTrainer):
    pass
