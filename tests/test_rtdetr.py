"""RT-DETR, the second detector family: trained from rtdetr-l.yaml (no weights), exported to ONNX, its
NMS-free [b, K, 6] output decoded by the serving Detector into the same Detections, parity-checked
against Ultralytics' own RT-DETR predictor, served through the worker path and `sqis eval`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from inference_workers.detections import Detections
from inference_workers.detector import ARCH_RTDETR, ARCH_YOLOV8, LetterboxMeta, model_arch, stretch
from infra.settings import Settings

REF = {"frame_id": "00000000-0000-0000-0000-000000000002", "line_id": "l1", "camera_id": "cam-1", "seq": 1,
       "captured_at": 1_700_000_000_000_000, "uri": "file:///frame.jpg"}


# ---- the decode alone (no model) ----------------------------------------------------------------
def test_decode_maps_normalised_boxes_to_frame_pixels_with_per_class_thresholds() -> None:
    img = np.zeros((100, 200, 3), np.uint8)  # h=100, w=200, stretched to a 64x64 input
    canvas, meta = stretch(img, (64, 64))
    assert canvas.shape == (64, 64, 3) and (meta.pad_x, meta.pad_y) == (0.0, 0.0)
    pred = np.array([  # cx, cy, w, h (normalised to the input), score, class; highest first as exported
        [0.50, 0.50, 0.20, 0.40, 0.90, 1],
        [0.25, 0.75, 0.10, 0.10, 0.60, 0],
        [0.50, 0.50, 0.20, 0.40, 0.40, 0],  # the first query again, another class (top-k over query x class)
        [0.98, 0.02, 0.10, 0.10, 0.35, 1],  # crosses the frame's corner: clipped
        [0.10, 0.10, 0.10, 0.10, 0.20, 1],  # below class 1's threshold
    ], np.float32)
    d = Detections.from_rtdetr_output(pred, np.array([0.3, 0.3], np.float32), (64, 64),
                                      class_names=["scratch", "patch"], letterbox=meta)
    assert len(d) == 4
    np.testing.assert_allclose(d.xyxy[0], [80, 30, 120, 70], atol=1e-3)  # the frame's pixels, not the input's
    np.testing.assert_allclose(d.xyxy[1], [40, 70, 60, 80], atol=1e-3)
    np.testing.assert_allclose(d.xyxy[3], [186, 0, 200, 7], atol=1e-3)
    assert d.class_id.tolist() == [1, 0, 0, 1] and [r.class_name for r in d] == ["patch", "scratch", "scratch", "patch"]
    np.testing.assert_allclose(d.confidence, [0.9, 0.6, 0.4, 0.35], rtol=1e-6)
    # per-class: a higher class-0 threshold drops both class-0 rows, nothing else; max_det keeps the best
    d2 = Detections.from_rtdetr_output(pred, np.array([0.7, 0.3], np.float32), (64, 64), letterbox=meta)
    assert d2.class_id.tolist() == [1, 1]
    assert len(Detections.from_rtdetr_output(pred, np.zeros(2, np.float32), (64, 64), max_det=2)) == 2
    with pytest.raises(ValueError, match=r"\[K, 6\]"):
        Detections.from_rtdetr_output(pred[:, :5], np.zeros(2, np.float32), (64, 64))


def test_family_comes_from_metadata_or_output_shape_not_the_file_name() -> None:
    assert model_arch({"head": "RTDETRDecoder"}, ["batch", "anchors", 6], 2) == ARCH_RTDETR
    assert model_arch({"head": "Detect"}, ["batch", 6, "anchors"], 2) == ARCH_YOLOV8
    assert model_arch({}, [1, 300, 6], 6) == ARCH_RTDETR  # no Ultralytics metadata: the shape decides
    assert model_arch({}, [1, 6, 1344], 2) == ARCH_YOLOV8
    assert model_arch({}, [1, 10, 1344], 6) == ARCH_YOLOV8
    meta = LetterboxMeta(1.0, 1.0, 0.0, 0.0, 10, 10)
    assert meta.gain_x == 1.0


# ---- a real rtdetr-l (random init, one tiny epoch) -----------------------------------------------
@pytest.fixture(scope="module")
def rtdetr(tmp_path_factory: pytest.TempPathFactory) -> tuple[Settings, Path, object]:
    pytest.importorskip("ultralytics", reason="needs the train extra")
    from tests.test_train import build_tiny_dataset
    from training.train import train

    tmp = tmp_path_factory.mktemp("rtdetr")
    data = build_tiny_dataset(tmp / "data", n_train=4, n_val=2, n_test=2)
    settings = Settings(state_dir=tmp / "state", mlflow_tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}",
                        onnx_providers="cpu", onnx_threads=1)
    # untrained scores sit near 0.01 (the decoder's prior): compare and serve at 0.001
    result = train(data, model="rtdetr-l", imgsz=64, epochs=1, batch=4, workers=0, device="cpu", augment=False,
                   settings=settings, experiment="test", register_name="tiny-rtdetr", conf=0.001)
    return settings, data, result


def test_rtdetr_trains_exports_passes_parity_and_registers_tagged(rtdetr: tuple[Settings, Path, object]) -> None:
    from training.export import read_metadata
    from training.registry import client_for, list_versions

    settings, _, result = rtdetr
    assert result.epochs_run == 1 and result.onnx_path is not None
    p = result.parity
    assert p is not None and p.status == "passed" and p.matched > 0, p
    meta = read_metadata(result.onnx_path)
    assert meta["head"] == "RTDETRDecoder" and meta["sqis_arch"] == "rtdetr"
    client = client_for(settings)
    assert client.get_run(result.run_id).data.tags["arch"] == "rtdetr"
    assert client.get_run(result.run_id).data.params["amp"] == "False"
    (v,) = list_versions(client, "tiny-rtdetr")
    assert v.tags["arch"] == "rtdetr" and v.tags["model"] == "rtdetr-l"


def test_detector_matches_ultralytics_on_a_non_square_frame(rtdetr: tuple[Settings, Path, object]) -> None:
    """The stretch and the decode, against Ultralytics' RTDETRPredictor on the .pt, on frames whose
    aspect ratio differs from the input's (a letterbox would shift every box)."""
    from inference_workers.detector import Detector, Thresholds, make_session
    from training.export import load_ultralytics, parity_check

    settings, _, result = rtdetr
    rng = np.random.default_rng(1)
    frames = [rng.integers(0, 255, (90, 150, 3), dtype=np.uint8), rng.integers(0, 255, (120, 40, 3), dtype=np.uint8)]
    det = Detector(make_session(result.onnx_path, "cpu", 1), Thresholds(default_score=0.001))
    assert det.arch == "rtdetr" and det.resize == "stretch"
    ours = det.detect(frames)
    ref = load_ultralytics(result.best_pt, settings.state_dir).predict(frames, conf=0.001, imgsz=64, verbose=False)
    for frame, d, r in zip(frames, ours, ref, strict=True):
        h, w = frame.shape[:2]
        assert len(d) > 0 and d.xyxy[:, [0, 2]].max() <= w and d.xyxy[:, [1, 3]].max() <= h
        tb = r.boxes.xyxy.numpy().copy()
        tb[:, [0, 2]] = tb[:, [0, 2]].clip(0, w)
        tb[:, [1, 3]] = tb[:, [1, 3]].clip(0, h)
        # the same rows in the same order (scores sorted, ties aside): compare the top ones one to one
        k = min(len(d), len(tb), 20)
        np.testing.assert_allclose(d.confidence[:k], r.boxes.conf.numpy()[:k], atol=2e-3)
        np.testing.assert_allclose(d.xyxy[:k], tb[:k], atol=0.5)
        assert d.class_id[:k].tolist() == r.boxes.cls.numpy()[:k].astype(int).tolist()
    report = parity_check(result.best_pt, result.onnx_path, frames, conf=0.001, state_dir=settings.state_dir)
    assert report.passed and report.matched > 0


def test_rtdetr_served_through_the_worker_path_and_eval(rtdetr: tuple[Settings, Path, object], tmp_path: Path) -> None:
    from inference_workers.detector import Thresholds
    from inference_workers.inference import inspect_one, load_served
    from training.evaluate import evaluate

    settings, data, result = rtdetr
    s = Settings(state_dir=tmp_path, onnx_providers="cpu", onnx_threads=1)
    model = load_served(s, str(result.onnx_path), Thresholds(default_score=0.001))
    img = np.random.default_rng(2).integers(0, 255, (90, 140, 3), dtype=np.uint8)
    rec = inspect_one(cv2.imencode(".png", img)[1].tobytes(), REF, model)
    assert (rec["width"], rec["height"]) == (140, 90) and rec["detections"] and rec["verdict"] == "FAIL"
    assert all(0 <= d["x1"] <= d["x2"] <= 140 and 0 <= d["y1"] <= d["y2"] <= 90 for d in rec["detections"])
    assert {d["class_name"] for d in rec["detections"]} <= {"scratch", "patch"}
    # the staged path (frames prepared in the fetch pool) gives the same as a plain run
    prepared = model.prepare(img)
    out = model.run([img], [prepared])
    assert out.prepared_used and len(out.results[0]) == len(rec["detections"]) and out.max_scores[0] > 0.001
    # a frame letterboxed for a YOLOv8 model of the same input size (before a hot swap) is not reused
    from inference_workers.detector import PreparedFrame

    stale = PreparedFrame(prepared.tensor, prepared.meta, (*prepared.key[:3], "letterbox"))
    assert model.det.batch_prepared([stale]) is None and not model.run([img], [stale]).prepared_used

    # the review queue's sub-threshold candidates decode the NMS-free rows too (not as YOLOv8 anchors)
    top = float(out.max_scores[0])
    below = load_served(s, str(result.onnx_path), Thresholds(default_score=min(1.0, top + 0.01)))
    pass_out, fwd = below.detect_batch([img])
    cands = below.candidates(fwd, 0, 0.2, 3)
    assert cands is not None and 1 <= len(cands) <= 3
    assert all(top + 0.01 - 0.2 - 1e-6 <= c < top + 0.01 for c in cands.confidence)
    assert (cands.xyxy[:, [0, 2]] <= 140).all() and (cands.xyxy[:, [1, 3]] <= 90).all() and (cands.xyxy >= 0).all()

    ev = evaluate(str(result.onnx_path), data, "test", 0.25, 0.45, settings=settings)
    assert ev["images"] == 2 and ev["model"]["arch"] == "rtdetr" and 0.0 <= ev["map50"] <= 1.0
