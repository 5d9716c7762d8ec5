"""Detector on a small untrained YOLOv8n (3 classes) exported to ONNX, compared with Ultralytics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference_workers.detector import (
    Detection,
    DetectorError,
    LetterboxMeta,
    Thresholds,
    letterbox,
)
from inference_workers.model_loader import load_detector
from infra.settings import Settings

IMGSZ = 96
NAMES = {0: "scratch", 1: "patch", 2: "pit"}


def build_tiny_model(out_dir: Path, imgsz: int = IMGSZ) -> tuple[Path, Path]:
    """An untrained YOLOv8n with 3 classes whose head is perturbed so scores spread over (0, 1)."""
    pytest.importorskip("ultralytics")
    from training.export import export_onnx
    from training.offline import import_ultralytics

    import_ultralytics(out_dir / "state")
    import torch
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=len(NAMES), verbose=False)
    model.names = dict(NAMES)
    head = model.model[-1]
    # An untrained net's features are near-constant; recompute BatchNorm statistics on real-ish
    # inputs and sharpen the head so scores and boxes vary with the image, as a trained model's do.
    from inference_workers.detector import letterbox

    calib = [letterbox(im, (imgsz, imgsz))[0] for s in range(4) for im in _images(s)]
    x = torch.from_numpy(np.stack(calib)[..., ::-1].transpose(0, 3, 1, 2) / 255.0).float()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.momentum = None
                mod.reset_running_stats()
        for seq in head.cv3:  # class scores spread around sigmoid(-1.5)
            seq[-1].bias.fill_(-1.5)
        for seq in head.cv2:  # DFL bins biased to short distances: boxes of a few strides, not the whole image
            seq[-1].weight.mul_(0.3)
            seq[-1].bias.copy_(torch.arange(head.reg_max).float().mul(-0.5).repeat(4))
        model.train()
        model(x)
    model.eval()
    pt = out_dir / "tiny.pt"
    torch.save({"model": model, "train_args": {"imgsz": imgsz, "task": "detect"}, "epoch": -1, "date": None}, pt)
    onnx_path = export_onnx(pt, out_dir / "tiny.onnx", imgsz=imgsz, name="tiny-det", version="3",
                            state_dir=out_dir / "state")
    return pt, onnx_path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return Settings(state_dir=tmp_path / "state", onnx_providers="cpu", onnx_threads=1)


def _images(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    imgs = []
    for h, w in [(120, 200), (300, 100), (96, 96), (57, 311)]:
        img = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        img[h // 4: h // 2, w // 3: w // 2] = 255  # a bright block, something to respond to
        imgs.append(img)
    return imgs


def test_metadata_is_read(tiny_model: tuple[Path, Path], settings: Settings) -> None:
    det = load_detector(settings, str(tiny_model[1]), Thresholds())
    assert det.class_names == ["scratch", "patch", "pit"]
    assert det.imgsz == (IMGSZ, IMGSZ)
    assert (det.name, det.version) == ("tiny-det", "3")
    assert det.providers == ["CPUExecutionProvider"]


def test_batched_equals_single_and_boxes_in_bounds(tiny_model: tuple[Path, Path], settings: Settings) -> None:
    det = load_detector(settings, str(tiny_model[1]), Thresholds(default_score=0.3))
    imgs = _images()
    batched = det.detect(imgs)
    assert len(batched) == len(imgs)
    assert sum(len(d) for d in batched) > 0
    for img, dets in zip(imgs, batched, strict=True):
        single = det.detect([img])[0]
        assert [(d.class_id, round(d.score, 4)) for d in single] == [(d.class_id, round(d.score, 4)) for d in dets]
        h, w = img.shape[:2]
        for d in dets:
            assert isinstance(d, Detection)
            assert 0 <= d.x1 <= d.x2 <= w and 0 <= d.y1 <= d.y2 <= h
            assert d.score > 0.3
            assert d.class_name == det.class_names[d.class_id]
        scores = [d.score for d in dets]
        assert scores == sorted(scores, reverse=True)


def test_per_class_thresholds(tiny_model: tuple[Path, Path], settings: Settings) -> None:
    base = load_detector(settings, str(tiny_model[1]), Thresholds(default_score=0.2))
    strict = base.with_thresholds(Thresholds(default_score=0.2, per_class={"scratch": 0.999}))
    imgs = _images(1)
    a, b = base.detect(imgs), strict.detect(imgs)
    assert any(d.class_name == "scratch" for ds in a for d in ds)
    assert not any(d.class_name == "scratch" and d.score <= 0.999 for ds in b for d in ds)
    others_a = [(d.class_id, round(d.score, 5)) for ds in a for d in ds if d.class_name != "scratch"]
    others_b = [(d.class_id, round(d.score, 5)) for ds in b for d in ds if d.class_name != "scratch"]
    # per-class NMS: dropping scratch boxes never changes the other classes
    assert others_a == others_b
    with pytest.raises(DetectorError):
        base.with_thresholds(Thresholds(per_class={"crack": 0.5}))


def test_grayscale_and_empty_inputs(tiny_model: tuple[Path, Path], settings: Settings) -> None:
    det = load_detector(settings, str(tiny_model[1]), Thresholds(default_score=0.2))
    grey = _images()[0][..., 0].copy()
    out = det.detect([grey])
    assert out[0] == det.detect([np.repeat(grey[..., None], 3, axis=2)])[0]
    assert det.detect([]) == []
    with pytest.raises(DetectorError):
        det.detect([np.zeros((10, 10, 3), np.float32)])


def test_postprocess_maps_boxes_to_original_pixels(tiny_model: tuple[Path, Path], settings: Settings) -> None:
    """A hand-made raw output: one box at a known letterboxed place, decoded and mapped back."""
    det = load_detector(settings, str(tiny_model[1]), Thresholds(default_score=0.5))
    img = np.zeros((100, 200, 3), np.uint8)  # gain 0.48 -> 96x48, pad top 24
    _, meta = letterbox(img, det.imgsz)
    assert meta == LetterboxMeta(gain_x=0.48, gain_y=0.48, pad_x=0.0, pad_y=24.0, height=100, width=200)
    raw = np.zeros((1, 7, 5), np.float32)
    raw[0, :4, 0] = [48, 48, 24, 12]  # cx, cy, w, h -> x1..y2 = 36, 42, 60, 54 in letterboxed pixels
    raw[0, 5, 0] = 0.9  # class 1
    raw[0, :4, 1] = [95, 70, 20, 20]  # runs past the right edge: clipped
    raw[0, 6, 1] = 0.8
    raw[0, 4, 2] = 0.4  # below threshold
    out = det.postprocess(raw, [meta])[0]
    assert [(d.class_name, round(d.score, 3)) for d in out] == [("patch", 0.9), ("pit", 0.8)]
    np.testing.assert_allclose(out[0].xyxy, (75.0, 37.5, 125.0, 62.5), atol=1e-4)
    assert out[1].x2 == 200.0


def test_load_errors(tmp_path: Path, settings: Settings) -> None:
    with pytest.raises(DetectorError):
        load_detector(settings, str(tmp_path / "missing.onnx"), Thresholds())
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(DetectorError):
        load_detector(settings, str(bad), Thresholds())
    with pytest.raises(ValueError):
        Thresholds(default_score=1.5)


def test_thresholds_to_avro() -> None:
    t = Thresholds(default_score=0.3, iou=0.5, per_class={"patch": 0.6})
    assert t.to_avro() == {"default_score": 0.3, "iou": 0.5, "per_class": {"patch": 0.6}, "source": "settings",
                           "image_score": None}
    cal = Thresholds.from_dict({**t.to_avro(), "image_score": 0.4}, source="calibrated:models:/m/2")
    assert cal.image_score == 0.4 and cal.source == "calibrated:models:/m/2" and cal.per_class == {"patch": 0.6}
    assert t.score_for("patch") == 0.6 and t.score_for("pit") == 0.3


@pytest.mark.train
def test_parity_with_ultralytics(tiny_model: tuple[Path, Path], tmp_path: Path) -> None:
    from training.export import parity_check

    pt, onnx_path = tiny_model
    report = parity_check(pt, onnx_path, _images(2) + _images(3), conf=0.25, iou=0.45, state_dir=tmp_path / "s")
    assert report.matched > 0
    assert report.passed, report.to_dict()
