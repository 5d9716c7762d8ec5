"""Segmentation (issue #11): mask encodings, YOLOv8-seg decoding and its parity with Ultralytics, SAM export
(tiny random SAM) with the encoder-once / batched-decoder contract, size rules, mask metrics and the
box mAP against pycocotools."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from inference_workers.segment import (
    label_image,
    mask_iou,
    mask_length_px,
    mask_polygon,
    mask_record,
    rle_decode,
    rle_encode,
)
from inference_workers.segment_stage import SegmentationStage, SizeRule, apply_rules, parse_rules
from training.mask_metrics import GtInstance, MaskEvaluator, PredInstance, pixel_auroc

pytest.importorskip("pycocotools")


# ---- encodings ------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_rle_round_trips_through_pycocotools(seed: int) -> None:
    from pycocotools import mask as mask_utils

    rng = np.random.default_rng(seed)
    m = rng.random((37, 23)) > 0.6
    if seed == 1:
        m[0, 0] = True  # a mask starting with a set pixel: counts begin with a zero-length run
    if seed == 2:
        m[:] = False
    rle = rle_encode(m)
    assert rle["height"] == 37 and rle["width"] == 23 and rle["area"] == int(m.sum())
    assert sum(rle["counts"]) == m.size
    assert np.array_equal(rle_decode(rle), m)
    coco = mask_utils.frPyObjects({"size": [37, 23], "counts": rle["counts"]}, 37, 23)
    assert int(mask_utils.area(coco)) == rle["area"]


def test_polygon_length_and_label_image() -> None:
    m = np.zeros((50, 80), bool)
    m[10:20, 5:45] = True  # 40 x 10 px
    poly = np.array(mask_polygon(m)).reshape(-1, 2)
    assert len(poly) == 4
    assert poly[:, 0].min() == 5 and poly[:, 0].max() == 44 and poly[:, 1].min() == 10 and poly[:, 1].max() == 19
    assert abs(mask_length_px(m) - (np.hypot(39, 9) + 1)) < 1e-6
    assert mask_polygon(np.zeros((5, 5), bool)) == [] and mask_length_px(np.zeros((5, 5), bool)) == 0.0
    m2 = np.zeros_like(m)
    m2[15:30, 40:60] = True
    lab = label_image([m, m2], 50, 80)
    assert lab.dtype == np.uint16 and lab[12, 10] == 1 and lab[25, 50] == 2 and lab[17, 42] == 2 and lab[0, 0] == 0
    info = mask_record(m)
    assert info.area_px == 400 and info.rle["area"] == 400


# ---- size rules and the stage -----------------------------------------------------------------------
class _Thr:
    def __init__(self, default: float = 0.25) -> None:
        self.default = default

    def score_for(self, name: str) -> float:
        return self.default


def test_rule_parsing_and_bad_rules() -> None:
    assert parse_rules("length_mm>2:scratch, area_mm2>=0.5") == [
        SizeRule("length_mm", ">", 2.0, "scratch"), SizeRule("area_mm2", ">=", 0.5, None)]
    assert str(SizeRule.parse("length_mm > 2 : scratch")) == "length_mm>2:scratch"
    for bad in ("width_mm>2", "length_mm>>2", "length_mm>two", ""):
        if bad:
            with pytest.raises(ValueError, match="verdict rule"):
                SizeRule.parse(bad)


def test_settings_reject_a_bad_rule_in_one_line() -> None:
    from infra.cli_common import UserError, build_settings

    with pytest.raises(UserError, match="verdict_rules"):
        build_settings(verdict_rules="length_mm>>2")
    with pytest.raises(UserError, match="camera_pixel_mm"):
        build_settings(camera_pixel_mm={"cam-1": 0.0})


def _det(name: str, score: float, x1: float, y1: float, x2: float, y2: float) -> dict[str, Any]:
    return {"class_id": 0, "class_name": name, "score": score, "x1": x1, "y1": y1, "x2": x2, "y2": y2, "mask": None}


def test_apply_rules_size_decides_for_classes_with_size_rules() -> None:
    rules = parse_rules("length_mm>2:scratch")
    short = {**_det("scratch", 0.9, 0, 0, 10, 1), "length_mm": 1.0}
    long_ = {**_det("scratch", 0.9, 0, 0, 10, 1), "length_mm": 2.5}
    spot = _det("spot", 0.9, 0, 0, 3, 3)
    assert apply_rules([short], rules, _Thr().score_for) == ("PASS", [])
    assert apply_rules([short, long_], rules, _Thr().score_for) == ("FAIL", ["length_mm>2:scratch"])
    assert apply_rules([spot], rules, _Thr().score_for) == ("FAIL", ["score>=0.25:spot"])
    unmeasured = _det("scratch", 0.9, 0, 0, 10, 1)
    assert apply_rules([unmeasured], rules, _Thr().score_for) == ("FAIL", ["length_mm>2:scratch(unmeasured)"])
    assert apply_rules([{**long_, "score": 0.1}], rules, _Thr().score_for) == ("PASS", [])


class _FixedSegmenter:
    name = "fixed:test@0"

    def __init__(self) -> None:
        self.calls = 0

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray, class_ids: Any) -> list[np.ndarray]:
        self.calls += 1
        out = []
        for x1, y1, x2, y2 in np.asarray(boxes_xyxy).astype(int):
            m = np.zeros(image.shape[:2], bool)
            m[y1:y2, x1:(x1 + x2) // 2] = True  # the left half of each box
            out.append(m)
        return out


def _record(dets: list[dict[str, Any]]) -> dict[str, Any]:
    return {"frame_id": "f-1", "line_id": "line-1", "camera_id": "cam-1", "detections": dets,
            "verdict": "FAIL", "timings": {"segment_ms": 0.0, "total_ms": 5.0}}


def test_stage_fills_masks_sizes_label_image_and_verdict(tmp_path: Path) -> None:
    import cv2

    from infra.objectstore import FileStore

    store = FileStore((tmp_path / "objs").as_uri())
    seg = _FixedSegmenter()
    stage = SegmentationStage(seg, store=store, pixel_mm={"cam-1": 0.1}, rules=parse_rules("length_mm>2:scratch"))
    rec = _record([_det("scratch", 0.9, 10, 10, 50, 14), _det("scratch", 0.8, 60, 60, 70, 62)])
    stage.apply(rec, np.zeros((100, 120, 3), np.uint8), _Thr())
    assert seg.calls == 1  # one call for all the frame's boxes
    d0, d1 = rec["detections"]
    assert d0["mask"]["area"] == 20 * 4 and d0["polygon"] and abs(d0["area_mm2"] - 0.8) < 1e-6
    assert abs(d0["length_mm"] - (np.hypot(19, 3) + 1) * 0.1) < 1e-6  # 2.02 mm: over the 2 mm rule
    assert d1["length_mm"] < 2
    assert rec["verdict"] == "FAIL" and rec["verdict_rules"] == ["length_mm>2:scratch"]
    assert rec["segmenter"] == "fixed:test@0" and rec["timings"]["segment_ms"] > 0
    lab = cv2.imdecode(np.frombuffer(store.get(rec["mask_uri"]), np.uint8), cv2.IMREAD_UNCHANGED)
    assert lab.shape == (100, 120) and lab[12, 15] == 1 and lab[61, 62] == 2 and lab[12, 45] == 0

    # the record still serialises as Inspection v2
    from schemas.serde import deserialize, serialize

    full = {**rec, "seq": 1, "part_id": None, "captured_at": 1, "inspected_at": 2, "image_uri": "file:///x.jpg",
            "width": 120, "height": 100, "model_name": "m", "model_version": "1",
            "thresholds": {"default_score": 0.25, "iou": 0.45, "per_class": {}},
            "timings": {k: 1.0 for k in ("queue_ms", "fetch_ms", "decode_ms", "infer_ms", "postprocess_ms",
                                         "segment_ms", "total_ms")},
            "batch_size": 1, "worker_id": "w", "source_partition": 0, "source_offset": 0}
    got = deserialize("inspection", *serialize("inspection", full))
    assert got["verdict_rules"] == ["length_mm>2:scratch"] and got["detections"][0]["mask"]["area"] == 80

    # no pixel size for the camera: box sizes stay unknown in mm and the mm rule fails safe
    rec2 = _record([_det("scratch", 0.9, 10, 10, 12, 11)])
    rec2["camera_id"] = "cam-9"
    SegmentationStage(None, rules=parse_rules("length_mm>2:scratch")).apply(rec2, None, _Thr())
    assert rec2["detections"][0].get("length_mm") is None
    assert rec2["verdict_rules"] == ["length_mm>2:scratch(unmeasured)"]


# ---- metrics ----------------------------------------------------------------------------------------
def _random_boxes(rng: np.random.Generator, n: int, size: int = 200) -> np.ndarray:
    xy = rng.uniform(0, size * 0.7, (n, 2))
    wh = rng.uniform(8, size * 0.3, (n, 2))
    return np.concatenate([xy, xy + wh], 1)


def test_mask_evaluator_perfect_and_shifted_masks() -> None:
    h, w = 40, 60
    gt = np.zeros((h, w), bool)
    gt[10:20, 10:30] = True
    shifted = np.zeros((h, w), bool)
    shifted[10:20, 15:35] = True  # IoU 15*10 / 25*10 = 0.6
    box = (10.0, 10.0, 30.0, 20.0)
    for pred_mask, iou in ((gt, 1.0), (shifted, 0.6)):
        ev = MaskEvaluator([0], {0: 0.25})
        ev.add("a", (w, h), [GtInstance("a", 0, box, gt)], [PredInstance("a", 0, 0.9, box, pred_mask)], gt)
        ev.add("b", (w, h), [], [PredInstance("b", 0, 0.1, box, pred_mask)], np.zeros((h, w), bool))
        r = ev.result()
        assert r["mean_mask_iou"] == pytest.approx(iou) and r["mean_dice"] == pytest.approx(2 * iou / (1 + iou))
        assert r["defects"] == 1 and r["detected_defects"] == 1
        if iou == 1.0:
            assert r["mask_map50"] == pytest.approx(1.0) and r["pixel_auroc"] == pytest.approx(1.0)
        else:
            assert r["mask_map50"] == pytest.approx(1.0) and r["mask_map50_95"] < 0.5 and r["pixel_auroc"] < 1.0


def test_pixel_auroc_known_values() -> None:
    s = [np.array([[0.9, 0.8], [0.1, 0.4]])]
    g = [np.array([[True, False], [False, True]])]
    # positives 0.9 and 0.4; negatives 0.8 and 0.1: pairs won 1 + 1 + 0 + 1 = 3 of 4
    assert pixel_auroc(s, g) == pytest.approx(0.75)
    assert pixel_auroc(s, [np.zeros((2, 2), bool)]) is None


# ---- YOLOv8-seg ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def yolo_seg(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An untrained YOLOv8n-seg (1 class 'defect', imgsz 128) with a spread class head: (.pt, .onnx)."""
    pytest.importorskip("ultralytics", reason="needs the train extra")
    from training.export import export_onnx
    from training.offline import import_ultralytics

    out = tmp_path_factory.mktemp("yoloseg")
    import_ultralytics(out / "state")
    import torch
    from ultralytics.nn.tasks import SegmentationModel

    torch.manual_seed(0)
    m = SegmentationModel("yolov8n-seg.yaml", nc=1, verbose=False)
    m.names = {0: "defect"}
    with torch.no_grad():
        for seq in m.model[-1].cv3:
            seq[-1].bias.uniform_(-3.5, -0.5)
            seq[-1].weight.mul_(20.0)
    m.eval()
    pt = out / "seg.pt"
    torch.save({"model": m, "train_args": {"imgsz": 128, "task": "segment"}, "epoch": -1, "date": None}, pt)
    return pt, export_onnx(pt, out / "seg.onnx", imgsz=128, name="tiny-seg", version="1", state_dir=out / "state")


def test_yolo_seg_masks_match_ultralytics(yolo_seg: tuple[Path, Path], tmp_path: Path) -> None:
    from training.segment_export import segment_parity_check

    pt, onnx = yolo_seg
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (100, 160, 3), dtype=np.uint8) for _ in range(2)]
    r = segment_parity_check(pt, onnx, imgs, conf=0.01, state_dir=tmp_path / "state")
    assert r.masks_compared > 5
    assert r.mean_mask_iou >= 0.9, r.to_dict()


def test_detector_serves_a_yolo_seg_model_and_the_segmenter_decodes_its_boxes(yolo_seg: tuple[Path, Path]) -> None:
    from inference_workers.detector import Detector, Thresholds, make_session
    from inference_workers.segment import YoloSegSegmenter

    _, onnx = yolo_seg
    sess = make_session(onnx, "cpu", 1)
    det = Detector(sess, Thresholds(default_score=0.01))
    img = np.random.default_rng(1).integers(0, 255, (90, 150, 3), dtype=np.uint8)
    dets = det.detect([img])[0]
    assert dets and det.class_names == ["defect"]
    seg = YoloSegSegmenter(sess, path=str(onnx))
    boxes = np.array([d.xyxy for d in dets[:5]])
    masks = seg.segment(img, boxes, [0] * len(boxes))
    assert len(masks) == len(boxes) and all(m.shape == (90, 150) and m.dtype == bool for m in masks)
    for m, (x1, y1, x2, y2) in zip(masks, boxes, strict=True):  # cropped to its box (1 px for resizing)
        ys, xs = np.nonzero(m)
        if xs.size:
            assert xs.min() >= x1 - 1.5 and xs.max() <= x2 + 1.5 and ys.min() >= y1 - 1.5 and ys.max() <= y2 + 1.5
    assert seg.segment(img, np.zeros((0, 4)), []) == []


def test_eval_reports_mask_metrics(yolo_seg: tuple[Path, Path], tmp_path: Path) -> None:
    from infra.settings import Settings
    from tests.dataset_fixtures import build_kolektor
    from training.evaluate import evaluate
    from training.importers import import_dataset

    build_kolektor(tmp_path / "src")
    import_dataset("kolektor", tmp_path / "src", tmp_path / "data")
    settings = Settings(state_dir=tmp_path / "state", onnx_providers="cpu", onnx_threads=1)
    out = evaluate(str(yolo_seg[1]), tmp_path / "data", "train", conf=0.01, settings=settings, segmenter="yolo-seg")
    mk = out["masks"]
    assert mk["segmenter"].startswith("yolo-seg:tiny-seg@1")
    assert mk["defects"] == 4  # train: kos01/Part1, kos02/Part1 and the two regions of kos02/Part2
    for k in ("mask_map50", "mask_map50_95", "mean_mask_iou", "mean_dice", "pixel_auroc"):
        assert mk[k] is not None and 0.0 <= mk[k] <= 1.0, k
    json.dumps(out)


# ---- SAM ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sam(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any]:
    pytest.importorskip("segment_anything", reason="needs the sam extra")
    from training.sam_export import build_tiny_sam, export_sam

    sam = build_tiny_sam()
    return sam, export_sam(sam, tmp_path_factory.mktemp("sam") / "tiny", sam_type="tiny")


def test_sam_export_parity_and_files(tiny_sam: tuple[Any, Any]) -> None:
    _, res = tiny_sam
    assert res.parity["passed"], res.parity
    assert res.parity["masks"] == 6 and res.parity["encoder_rel_diff"] < 1e-3
    info = json.loads((res.out_dir / "sam.json").read_text())
    assert info["type"] == "tiny" and info["img_size"] == 256 and info["mask_input_size"] == 64
    assert info["parity"]["passed"] is True


class _Counting:
    """An onnxruntime session wrapper that counts run() calls and the batch of the prompts."""

    def __init__(self, sess: Any) -> None:
        self.sess, self.calls, self.batches = sess, 0, []

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self.calls += 1
        if "point_coords" in feeds:
            self.batches.append(feeds["point_coords"].shape[0])
        return self.sess.run(names, feeds)

    def __getattr__(self, k: str) -> Any:
        return getattr(self.sess, k)


def test_sam_encodes_once_and_decodes_all_boxes_in_one_call(tiny_sam: tuple[Any, Any]) -> None:
    from inference_workers.segment import SamSegmenter

    _, res = tiny_sam
    seg = SamSegmenter.from_dir(res.out_dir, "cpu")
    seg.encoder, seg.decoder = _Counting(seg.encoder), _Counting(seg.decoder)
    img = np.random.default_rng(0).integers(0, 255, (120, 200, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 50], [80, 20, 150, 90], [5, 70, 40, 115], [100, 5, 195, 40], [0, 0, 200, 120]], float)
    masks = seg.segment(img, boxes, [0] * 5)
    assert seg.encoder.calls == 1 and seg.decoder.calls == 1 and seg.decoder.batches == [5]
    assert len(masks) == 5 and all(m.shape == (120, 200) and m.dtype == bool for m in masks)
    one = seg.segment(img, boxes[1:2], [0])[0]  # the same box alone: the same mask
    assert mask_iou(one, masks[1]) > 0.99
    assert seg.segment(img, np.zeros((0, 4)), []) == [] and seg.encoder.calls == 2


def test_sam_export_cli(tiny_sam: tuple[Any, Any], tmp_path: Path) -> None:
    import torch

    from sqis.cli import app

    sam, _ = tiny_sam
    ckpt = tmp_path / "tiny.pth"
    torch.save(sam.state_dict(), ckpt)
    from infra.cli_common import UserError
    from training.errors import TrainingError

    runner = CliRunner()
    base = ["sam", "export", "--out", str(tmp_path / "x"), "--state-dir", str(tmp_path / "s")]
    for args, msg in (([], "--checkpoint PATH is required"),
                      (["--checkpoint", str(tmp_path / "nope.pth")], "no such file"),
                      (["--checkpoint", str(ckpt), "--type", "vit_q"], "--type 'vit_q'"),
                      (["--checkpoint", str(ckpt), "--type", "vit_b", "--no-parity"], "not a vit_b SAM checkpoint")):
        r = runner.invoke(app, base + args)
        assert isinstance(r.exception, UserError | TrainingError) and msg in str(r.exception), (args, r.output)
    r = runner.invoke(app, ["sam", "export", "--checkpoint", str(ckpt), "--type", "tiny", "--out", str(tmp_path / "x"),
                            "--state-dir", str(tmp_path / "s")])
    assert r.exit_code == 0, r.output
    info = json.loads((tmp_path / "x" / "sam.json").read_text())
    assert info["parity"]["passed"] and len(info["checkpoint_sha256"]) == 64


def test_overlay_draws_masks_where_present() -> None:
    from inference_workers.segment import draw_inspection

    img = np.full((40, 60, 3), 128, np.uint8)
    m = np.zeros((40, 60), bool)
    m[5:15, 5:25] = True
    info = mask_record(m)
    dets = [{"class_id": 0, "class_name": "scratch", "score": 0.9, "x1": 5, "y1": 5, "x2": 25, "y2": 15,
             "mask": info.rle, "polygon": info.polygon, "length_mm": 1.2},
            {"class_id": 1, "class_name": "spot", "score": 0.5, "x1": 40, "y1": 25, "x2": 50, "y2": 35, "mask": None}]
    out = draw_inspection(img, dets)
    assert out.shape == img.shape and np.array_equal(img, np.full((40, 60, 3), 128, np.uint8))  # input untouched
    assert not np.array_equal(out[10, 15], img[10, 15])  # inside the mask: tinted
    assert np.array_equal(out[30, 45], img[30, 45])  # inside the box without mask: not filled
    assert not np.array_equal(out[25, 40], img[25, 40])  # its box outline is drawn


def test_worker_with_yolo_seg_emits_masks_sizes_rules_and_label_images(settings_factory: Any,
                                                                     yolo_seg: tuple[Path, Path]) -> None:
    """The real worker on the real broker with segmenter=yolo-seg (the detector's own model), a pixel size
    for one camera and a size rule: Inspections carry masks, polygons, mm sizes, rules and a label image."""
    import cv2

    from inference_workers.detector import Thresholds
    from inference_workers.worker import InferenceWorker
    from infra.objectstore import open_store
    from sqis.bench.harness import FramePublisher, TopicCollector
    from tests.model_fixtures import RunningWorker

    s = settings_factory(segmenter="yolo-seg", camera_pixel_mm={"cam-01": 0.05}, verdict_rules="length_mm>3:defect")
    pub = FramePublisher(s, cameras=2, lines=1, size=128)
    insp = TopicCollector(s, "inspections")
    w = RunningWorker(InferenceWorker(s, str(yolo_seg[1]), Thresholds(default_score=0.05), max_batch=4,
                                      max_wait_ms=20, fetch_threads=1, group_id=f"iw-seg-{s.topic_prefix}"))
    try:
        refs = pub.prepare(6)
        pub.publish(refs)
        assert insp.wait_frames({r["frame_id"] for r in refs}, 120)
        w.stop()
        recs = insp.snapshot()
    finally:
        insp.close()
        pub.close()
    with_dets = [r for r in recs if r["detections"]]
    assert with_dets, "the spread head should detect something at 0.05"
    store = open_store(s)
    for r in with_dets:
        assert r["segmenter"] == "yolo-seg:tiny-seg@1" and r["mask_uri"] and r["timings"]["segment_ms"] > 0
        lab = cv2.imdecode(np.frombuffer(store.get(r["mask_uri"]), np.uint8), cv2.IMREAD_UNCHANGED)
        assert lab.shape == (128, 128) and lab.max() <= len(r["detections"])
        for d in r["detections"]:
            assert d["mask"]["height"] == 128 and sum(d["mask"]["counts"]) == 128 * 128
            if r["camera_id"] == "cam-01":
                assert d["area_mm2"] == pytest.approx(d["mask"]["area"] * 0.0025, rel=1e-4)
                assert d["length_mm"] is not None
            else:
                assert d["area_mm2"] is None and d["length_mm"] is None
        expect = "FAIL" if r["verdict_rules"] else "PASS"
        assert r["verdict"] == expect
        if r["camera_id"] != "cam-01":  # no pixel size: the mm rule cannot be checked, fail-safe
            assert r["verdict_rules"] == ["length_mm>3:defect(unmeasured)"]


@pytest.mark.train
def test_train_task_segment_exports_checks_masks_and_registers(tmp_path: Path) -> None:
    """`sqis train --task segment` on an imported mask dataset: YOLOv8n-seg, 1 epoch at 64 px, ONNX with
    the prototype output, box + mask parity check, registration."""
    pytest.importorskip("ultralytics", reason="needs the train extra")
    import onnxruntime as ort

    from infra.settings import Settings
    from tests.dataset_fixtures import build_kolektor
    from training.errors import TrainingError
    from training.importers import import_dataset
    from training.train import train

    build_kolektor(tmp_path / "src")
    import_dataset("kolektor", tmp_path / "src", tmp_path / "data")
    settings = Settings(state_dir=tmp_path / "state", mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                        onnx_providers="cpu", onnx_threads=1)
    res = train(tmp_path / "data", model="yolov8n", imgsz=64, epochs=1, batch=4, workers=0, settings=settings,
                experiment="test", register_name="tiny-seg", conf=0.001, task="segment", augment=False,
                allow_unverified_parity=True)
    assert res.onnx_path is not None and len(ort.InferenceSession(str(res.onnx_path)).get_outputs()) == 2
    assert res.parity is not None and res.parity.status in ("passed", "unverified")
    assert res.parity.to_dict()["masks_compared"] >= 0 and res.model_version == "1"
    assert "mask_map50" in res.metrics
    with pytest.raises(TrainingError, match="--task"):
        train(tmp_path / "data", task="pose", settings=settings, mlflow=False)
    det_only = tmp_path / "det"
    (det_only / "images" / "train").mkdir(parents=True)
    (det_only / "data.yaml").write_text(f"path: {det_only}\ntrain: images/train\nval: images/train\nnames: {{0: a}}\n")
    with pytest.raises(TrainingError, match="labels-seg"):
        train(det_only, task="segment", settings=settings, mlflow=False)


def test_bench_segment_json(yolo_seg: tuple[Path, Path], tmp_path: Path) -> None:
    pytest.importorskip("segment_anything", reason="needs the sam extra")
    pytest.importorskip("timm", reason="needs the sam extra (timm)")
    from sqis.cli import app

    r = CliRunner().invoke(app, ["bench", "segment", "--sam-type", "tiny", "--image", "256", "--repeats", "1",
                                 "--yolo-model", str(yolo_seg[1]), "--tinyvit", "--json", "--state-dir", str(tmp_path)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert [row["boxes"] for row in out["sam"]["per_boxes"]] == [1, 5, 20]
    assert all(row["encoder_runs"] == 1 and row["decoder_ms"] > 0 for row in out["sam"]["per_boxes"])
    assert [row["boxes"] for row in out["yolo_seg"]["per_boxes"]] == [1, 5, 20]
    assert all(row["forward_runs"] == 1 and row["mask_decode_ms"] >= 0 for row in out["yolo_seg"]["per_boxes"])
    assert out["tinyvit"]["embedding"] == [1, 256, 16, 16] and out["tinyvit"]["encoder_ms"] > 0


def test_register_checkpoint_rejects_a_bad_parity_conf(tmp_path: Path) -> None:
    from infra.cli_common import UserError
    from sqis.cli import app

    r = CliRunner().invoke(app, ["model", "register-checkpoint", str(tmp_path / "x.pt"), "--data", str(tmp_path),
                                 "--parity-conf", "0", "--state-dir", str(tmp_path)])
    assert isinstance(r.exception, UserError) and "--parity-conf" in str(r.exception)


def _negated_protos(onnx_path: Path, out: Path) -> Path:
    """The same YOLOv8-seg graph with its prototypes negated: same boxes, (roughly) complementary masks."""
    import onnx

    m = onnx.load(str(onnx_path))
    old = m.graph.output[1].name
    m.graph.node.append(onnx.helper.make_node("Neg", [old], [f"{old}_neg"]))
    m.graph.output[1].name = f"{old}_neg"
    onnx.save(m, str(out))
    return out


def test_hot_swap_of_a_seg_model_under_load_moves_detector_and_masks_together(
        yolo_seg: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """segmenter=yolo-seg with the detector's own head: a promoted version is swapped while batches are in
    flight; every record names the model whose forward pass produced its masks (checked against that
    model run alone on the frame, and distinguishable from the other version's masks)."""
    import hashlib
    import uuid

    import cv2

    from inference_workers import model_loader
    from inference_workers.detector import Detector, Thresholds, make_session
    from inference_workers.inference import inspect_one, served_model
    from schemas.serde import serialize
    from tests.test_worker_faults import FakeMsg, FakeWatcher, Harness

    onnx_v1 = yolo_seg[1]
    onnx_v2 = _negated_protos(onnx_v1, tmp_path / "seg-v2.onnx")
    thr = Thresholds(default_score=0.05)
    models = {v: Detector(make_session(p, "cpu", 1), thr, name="tiny-seg", version=v, path=str(p))
              for v, p in (("1", onnx_v1), ("2", onnx_v2))}
    h = Harness(tmp_path, monkeypatch)
    h.settings = h.settings.model_copy(update={"segmenter": "yolo-seg"})

    class Watcher(FakeWatcher):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__()
            self.current = models["1"]  # type: ignore[assignment]

    monkeypatch.setattr(model_loader, "ModelWatcher", Watcher)
    rng = np.random.default_rng(1)
    images: dict[str, np.ndarray] = {}
    k = (h.catalog.frames, 0)
    for i in range(24):
        img = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        data = cv2.imencode(".png", img)[1].tobytes()
        fid = str(uuid.uuid4())
        images[fid] = img
        ref = {"frame_id": fid, "line_id": "l1", "camera_id": "c1", "seq": i, "captured_at": 1_700_000_000_000_000,
               "uri": h.store.put(f"f/{fid}.png", data), "width": 128, "height": 96, "encoding": "png",
               "content_sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data), "part_id": None,
               "trigger_id": None, "truth": None}
        value, headers = serialize("frame_ref", ref)
        h.logs[k].append(FakeMsg(k[0], k[1], i, b"c1", value, headers))
    w = h.worker(max_batch=4, pipeline_depth=2, thresholds=thr)

    def promote_midway(c: Any) -> None:
        if w.stats.consumed >= 10:
            w.watcher.promoted = models["2"]  # swapped between batches while others are in flight

    h.run_until_idle(w, promote_midway)
    recs = h.inspections()
    assert len(recs) == 24 and h.dead_letters() == []
    assert {r["model_version"] for r in recs} == {"1", "2"}
    alone = {v: served_model(d, segmenter="yolo-seg") for v, d in models.items()}
    checked = 0
    for r in recs:
        v, other = r["model_version"], "2" if r["model_version"] == "1" else "1"
        assert r["segmenter"] == f"yolo-seg:tiny-seg@{v}"
        ref = {k2: r[k2] for k2 in ("frame_id", "line_id", "camera_id", "seq", "captured_at")} | {"uri": r["image_uri"]}
        own = inspect_one(images[r["frame_id"]], ref, alone[v])
        theirs = inspect_one(images[r["frame_id"]], ref, alone[other])
        assert len(own["detections"]) == len(r["detections"])
        for d, o, t in zip(r["detections"], own["detections"], theirs["detections"], strict=False):
            m, mo, mt = (rle_decode(x["mask"]) for x in (d, o, t))
            assert mask_iou(m, mo) >= 0.95
            if mo.any() or mt.any():
                assert mask_iou(m, mt) < 0.5
                checked += 1
    assert checked >= 5


def test_yolo_seg_detector_decodes_boxes_and_masks_from_one_forward_pass(yolo_seg: tuple[Path, Path]) -> None:
    """The segmenting detector runs the model once per batch (not once more per frame for the masks),
    and its masks equal the standalone segmenter's for the same boxes."""
    from inference_workers.detector import Detector, Thresholds, make_session
    from inference_workers.inference import served_model
    from inference_workers.segment import YoloSegSegmenter

    sess = make_session(yolo_seg[1], "cpu", 1)
    det = Detector(sess, Thresholds(default_score=0.05), path=str(yolo_seg[1]))
    det.session = counting = _Counting(sess)  # type: ignore[assignment]
    model = served_model(det, segmenter="yolo-seg")
    rng = np.random.default_rng(3)
    imgs = [rng.integers(0, 255, (100, 160, 3), dtype=np.uint8) for _ in range(3)]
    out = model.run(imgs, [det.prepare_one(im) for im in imgs])
    assert counting.calls == 1 and out.prepared_used and model.segmenter_name == "yolo-seg:tiny-seg@1"
    alone = YoloSegSegmenter(sess, path=str(yolo_seg[1]))
    n = 0
    for img, dets, label in zip(imgs, out.results, out.labels, strict=True):
        assert not isinstance(dets, Exception) and dets.masks is not None and label is not None
        ref = alone.segment(img, dets.xyxy, dets.class_id, dets.confidence)
        for rle, m in zip(dets.masks, ref, strict=True):
            assert mask_iou(rle_decode(rle), m) >= 0.99
            n += 1
        assert set(dets.data) >= {"area_px", "length_px", "polygon"} and label.max() <= len(dets)
    assert n > 0
