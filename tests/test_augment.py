"""The augmentation path (training/augment.py): torchvision v2 photometric transforms in Ultralytics'
Albumentations slot; they change the image, never the boxes; --no-augment leaves no photometric step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ultralytics", reason="needs the train extra")
pytest.importorskip("torchvision", reason="needs the train extra")

from training.augment import (  # noqa: E402
    NO_AUGMENT_HYP,
    SURFACE_HYP,
    Photometric,
    names,
    surface_augmentations,
    swap_albumentations,
    trainer_class,
)


def _labels(seed: int = 0) -> dict:
    from ultralytics.utils.instance import Instances

    rng = np.random.default_rng(seed)
    img = rng.normal(128, 20, (64, 80, 3)).clip(0, 255).astype(np.uint8)
    img[20:30, 10:50] = 60  # a dark streak
    boxes = np.array([[10.0, 20.0, 50.0, 30.0], [5.0, 5.0, 15.0, 12.0]], dtype=np.float32)
    return {"img": img, "cls": np.array([[0.0], [1.0]], dtype=np.float32),
            "instances": Instances(boxes, segments=np.zeros((0, 1000, 2), dtype=np.float32), bbox_format="xyxy",
                                   normalized=False)}


def _always(transforms: list) -> list:
    for t in transforms:
        t.p = 1.0
    return transforms


def test_each_surface_transform_changes_the_image_and_never_the_boxes() -> None:
    import torch

    torch.manual_seed(0)
    for t in _always(surface_augmentations()):
        labels = _labels()
        before_img = labels["img"].copy()
        before_boxes = labels["instances"].bboxes.copy()
        out = Photometric([t])(labels)
        assert out["img"].shape == before_img.shape and out["img"].dtype == np.uint8, t
        assert not np.array_equal(out["img"], before_img), f"{t} left the image as it was"
        assert np.array_equal(out["instances"].bboxes, before_boxes), t
        assert np.array_equal(out["cls"], np.array([[0.0], [1.0]], dtype=np.float32)), t


def test_the_surface_set_is_photometric_only_and_named() -> None:
    assert names(surface_augmentations()) == ["RandomCLAHE", "ColorJitter", "RandomGamma", "GaussianNoise",
                                              "GaussianBlur", "JPEG"]
    # geometry stays with Ultralytics (boxes follow); no rotation/shear/colour hue for surfaces
    assert SURFACE_HYP["fliplr"] > 0 and SURFACE_HYP["mosaic"] > 0
    assert SURFACE_HYP["degrees"] == SURFACE_HYP["shear"] == SURFACE_HYP["hsv_h"] == 0
    assert all(v == 0 for v in NO_AUGMENT_HYP.values())


def _tiny(root: Path) -> Path:
    import cv2

    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(2):
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), _labels(i)["img"])
            (root / "labels" / split / f"{i}.txt").write_text("0 0.375 0.39 0.5 0.16\n")
    return root


def _steps(compose) -> list:
    out = []
    for t in getattr(compose, "transforms", []):
        out += [t] + _steps(t)
    return out


@pytest.mark.parametrize("augment", [True, False])
def test_trainer_puts_the_photometric_step_in_the_albumentations_slot(tmp_path: Path, augment: bool) -> None:
    """Ultralytics builds its Albumentations step (its own default list where albumentations is
    installed); the project's trainers replace it (augment) or drop it (--no-augment), also when
    close_mosaic rebuilds the transforms."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.augment import Albumentations
    from ultralytics.models.yolo.detect import DetectionTrainer

    root = _tiny(tmp_path / "data")
    cls = trainer_class("detect", augment)
    assert issubclass(cls, DetectionTrainer)
    trainer = object.__new__(cls)  # only build_dataset is exercised: it needs model, args and data
    trainer.model = type("M", (), {"stride": __import__("torch").tensor([8.0, 16.0, 32.0])})()
    trainer.args = get_cfg(overrides=(SURFACE_HYP if augment else NO_AUGMENT_HYP) | {"imgsz": 64})
    trainer.data = {"names": {0: "streak"}, "nc": 1, "channels": 3, "path": str(root)}
    ds = trainer.build_dataset(str(root / "images" / "train"), mode="train", batch=2)
    for _ in range(2):
        steps = _steps(ds.transforms)
        assert not any(isinstance(s, Albumentations) for s in steps)
        assert sum(isinstance(s, Photometric) for s in steps) == (1 if augment else 0)
        ds.close_mosaic(trainer.args)  # the last epochs rebuild the transforms
    val = trainer.build_dataset(str(root / "images" / "val"), mode="val", batch=2)
    assert not any(isinstance(s, Photometric) for s in _steps(val.transforms))
    ds[0]  # the pipeline runs


def test_swap_finds_nested_steps_and_removes_them() -> None:
    from ultralytics.data.augment import Albumentations, Compose

    inner = Compose([Albumentations(p=1.0, transforms=[])])
    outer = Compose([inner, Albumentations(p=1.0, transforms=[])])
    assert swap_albumentations(outer, None) == 2
    assert not any(isinstance(s, Albumentations) for s in _steps(outer))


def test_rtdetr_keeps_its_own_trainer_with_the_photometric_step() -> None:
    pytest.importorskip("ultralytics", reason="needs the train extra")
    from ultralytics.models.rtdetr.train import RTDETRTrainer

    for augment in (True, False):
        cls = trainer_class("detect", augment, "rtdetr")
        assert issubclass(cls, RTDETRTrainer)  # RT-DETR's loss, validator and dataset, not YOLO's
    with pytest.raises(ValueError):
        trainer_class("segment", True, "rtdetr")
