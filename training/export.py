"""Export a trained YOLOv8 or RT-DETR checkpoint to ONNX for the serving side (opset 18, dynamic batch,
onnxslim).

The ONNX metadata keeps Ultralytics' keys (names, imgsz, stride, head) and adds sqis_model_name /
_version and sqis_arch (yolov8 | rtdetr; the serving detector reads the family from `head`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.offline import import_ultralytics, require_train_extra

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_OPSET", "PARITY_CONF", "PARITY_TOLERANCE", "ParityReport", "checkpoint_arch", "export_onnx",
    "load_ultralytics", "match_detections", "parity_check", "read_metadata", "set_metadata",
]

DEFAULT_OPSET = 18
# ONNX (through inference_workers.detector) vs PyTorch (Ultralytics predict, same conf/iou/imgsz):
# detections matched by class and IoU >= match_iou must agree to |score diff| <= max_score_diff and
# IoU >= min_box_iou; no unmatched detection may score above conf + unmatched_margin (ones just over
# conf may flip sides of the threshold through float differences).
PARITY_TOLERANCE = {"max_score_diff": 0.02, "min_box_iou": 0.95, "unmatched_margin": 0.05, "match_iou": 0.5}
# The parity check runs below the operating threshold so an undertrained model still yields detections
# to compare; with no golden image or no matched detection the check proves nothing ("unverified").
PARITY_CONF = 0.05


def set_metadata(onnx_path: Path | str, **items: Any) -> None:
    """Add or replace metadata_props entries (values stored as str) of an ONNX file in place."""
    require_train_extra("onnx")
    import onnx

    model = onnx.load(str(onnx_path))
    props = {p.key: p.value for p in model.metadata_props}
    props.update({k: str(v) for k, v in items.items() if v is not None})
    del model.metadata_props[:]
    for k, v in props.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(onnx_path))


def read_metadata(onnx_path: Path | str) -> dict[str, str]:
    """The custom metadata map of an ONNX file (read through onnxruntime: no onnx/torch needed)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    return dict(sess.get_modelmeta().custom_metadata_map)


def load_ultralytics(weights: Path | str, state_dir: Path | str) -> Any:
    """An Ultralytics model object for a local .pt: RTDETR for an RT-DETR checkpoint (its predictor
    stretches the input and decodes the NMS-free head), else YOLO."""
    import_ultralytics(state_dir)
    from ultralytics import RTDETR, YOLO
    from ultralytics.nn.tasks import RTDETRDetectionModel

    model = YOLO(str(weights))
    if isinstance(model.model, RTDETRDetectionModel):
        model = RTDETR(str(weights))
    return model


def checkpoint_arch(model: Any) -> str:
    """'rtdetr' or 'yolov8' for an Ultralytics model object (see :func:`load_ultralytics`)."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    return "rtdetr" if isinstance(getattr(model, "model", None), RTDETRDetectionModel) else "yolov8"


def _ultralytics_export(weights: Path | str, out: Path | str | None, fmt: str, imgsz: int | None,
                        state_dir: Path | str, **kwargs: Any) -> tuple[Path, int]:
    """Ultralytics' export of a .pt to ``fmt`` on CPU, moved to ``out`` (default: next to the weights).
    imgsz defaults to the checkpoint's training size. Returns (the file, the image size used)."""
    model = load_ultralytics(weights, state_dir)
    if imgsz is None:
        imgsz = int(model.ckpt.get("train_args", {}).get("imgsz", 640)) if getattr(model, "ckpt", None) else 640
    produced = Path(model.export(format=fmt, imgsz=imgsz, batch=1, device="cpu", verbose=False, **kwargs))
    target = Path(out) if out is not None else produced
    if target.resolve() != produced.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(produced), target)
    return target, imgsz


def export_onnx(
    weights: Path | str, out: Path | str | None = None, *, imgsz: int | None = None, name: str | None = None,
    version: str | None = None, opset: int = DEFAULT_OPSET, dynamic: bool = True, simplify: bool = True,
    state_dir: Path | str = ".sqis",
) -> Path:
    """Export a .pt checkpoint to ONNX (dynamic batch, onnxslim) and return the .onnx path.

    imgsz defaults to the checkpoint's training size; out defaults to next to the weights.
    """
    require_train_extra("torch", "ultralytics", "onnx", "onnxslim")
    target, imgsz = _ultralytics_export(weights, out, "onnx", imgsz, state_dir, opset=opset, dynamic=dynamic,
                                        simplify=simplify, nms=False)
    head = read_metadata(target).get("head", "")
    set_metadata(target, sqis_model_name=name, sqis_model_version=version, sqis_opset=opset,
                 sqis_arch="rtdetr" if head == "RTDETRDecoder" else "yolov8")
    log.info("exported ONNX", extra={"weights": str(weights), "onnx": str(target), "imgsz": imgsz, "opset": opset})
    return target


def export_torchscript(
    weights: Path | str, out: Path | str | None = None, *, imgsz: int | None = None, state_dir: Path | str = ".sqis",
) -> Path:
    """Export a .pt checkpoint to TorchScript (for consumers that run libtorch rather than ONNX
    Runtime; serving here uses ONNX). The file takes a [1, 3, imgsz, imgsz] RGB float batch in [0, 1]
    and returns the raw [1, 4 + nc, N] head output, like the ONNX model."""
    require_train_extra("torch", "ultralytics")
    target, imgsz = _ultralytics_export(weights, out, "torchscript", imgsz, state_dir)
    log.info("exported TorchScript", extra={"weights": str(weights), "torchscript": str(target), "imgsz": imgsz})
    return target


@dataclass
class ParityReport:
    """Result of comparing the ONNX serving path with the PyTorch model on a golden image set."""

    images: int
    matched: int
    max_score_diff: float
    min_box_iou: float
    unmatched_above_margin: int
    unmatched_total: int
    conf: float
    iou: float
    tolerance: dict[str, float] = field(default_factory=lambda: dict(PARITY_TOLERANCE))
    passed: bool = False
    status: str = "failed"  # passed | failed | unverified (no golden image or no matched detection)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def match_detections(
    a_boxes: np.ndarray, a_cls: np.ndarray, b_boxes: np.ndarray, b_cls: np.ndarray, min_iou: float = 0.5,
) -> list[tuple[int, int, float]]:
    """Greedy one-to-one matching of same-class boxes by descending IoU: [(i_a, i_b, iou)]."""
    from inference_workers.nms import box_iou

    if len(a_boxes) == 0 or len(b_boxes) == 0:
        return []
    ious = box_iou(a_boxes, b_boxes)
    ious[np.asarray(a_cls)[:, None] != np.asarray(b_cls)[None, :]] = -1.0
    pairs = []
    order = np.dstack(np.unravel_index(np.argsort(-ious, axis=None), ious.shape))[0]
    used_a, used_b = set(), set()
    for i, j in order:
        v = float(ious[i, j])
        if v < min_iou:
            break
        if i in used_a or j in used_b:
            continue
        used_a.add(int(i))
        used_b.add(int(j))
        pairs.append((int(i), int(j), v))
    return pairs


def parity_check(
    weights: Path | str, onnx_path: Path | str, images: Sequence[Path | str | np.ndarray], *,
    conf: float = PARITY_CONF, iou: float = 0.45, state_dir: Path | str = ".sqis",
    tolerance: dict[str, float] | None = None,
) -> ParityReport:
    """Run the ONNX model through inference_workers.detector and the .pt through Ultralytics predict
    (YOLO, or RTDETR for an RT-DETR checkpoint: its own stretch and NMS-free decode; iou is then unused).

    Passes when matched detections differ by <= max_score_diff in score and overlap with IoU >=
    min_box_iou, and no unmatched detection scores above conf + unmatched_margin (PARITY_TOLERANCE).
    With no image or no matched detection nothing was compared: status "unverified", passed False.
    """
    import cv2

    tol = dict(PARITY_TOLERANCE, **(tolerance or {}))
    arrays = []
    for im in images:
        arr = cv2.imread(str(im), cv2.IMREAD_COLOR) if not isinstance(im, np.ndarray) else im
        if arr is None:
            raise FileNotFoundError(f"cannot read golden image {im}")
        arrays.append(arr)
    if not arrays:
        report = ParityReport(images=0, matched=0, max_score_diff=0.0, min_box_iou=0.0, unmatched_above_margin=0,
                              unmatched_total=0, conf=conf, iou=iou, tolerance=tol, status="unverified")
        log.warning("parity check unverified: no golden images", extra=report.to_dict())
        return report

    from inference_workers.detector import Detector, Thresholds, make_session

    det = Detector(make_session(onnx_path, "cpu"), Thresholds(default_score=conf, iou=iou), path=str(onnx_path))
    model = load_ultralytics(weights, state_dir)
    if checkpoint_arch(model) != det.arch:
        raise ValueError(f"{weights} is a {checkpoint_arch(model)} checkpoint but {onnx_path} a {det.arch} model")
    max_diff, min_iou, matched, unmatched, unmatched_hi = 0.0, 1.0, 0, 0, 0
    margin = conf + tol["unmatched_margin"]
    for k in range(0, len(arrays), 8):
        chunk = arrays[k:k + 8]
        onnx_dets = det.detect(chunk)
        results = model.predict(chunk, conf=conf, iou=iou, imgsz=list(det.imgsz), rect=False, device="cpu",
                                verbose=False, max_det=det.max_det)
        for dets, res, img in zip(onnx_dets, results, chunk, strict=True):
            ob = np.array([d.xyxy for d in dets], dtype=np.float64).reshape(-1, 4)
            oc = np.array([d.class_id for d in dets], dtype=np.int64)
            os_ = np.array([d.score for d in dets], dtype=np.float64)
            tb = res.boxes.xyxy.cpu().numpy().astype(np.float64).reshape(-1, 4)
            # the serving side clips boxes to the frame; YOLO's predictor does too, RT-DETR's does not
            tb[:, [0, 2]] = tb[:, [0, 2]].clip(0, img.shape[1])
            tb[:, [1, 3]] = tb[:, [1, 3]].clip(0, img.shape[0])
            tc = res.boxes.cls.cpu().numpy().astype(np.int64)
            ts = res.boxes.conf.cpu().numpy().astype(np.float64)
            pairs = match_detections(ob, oc, tb, tc, tol["match_iou"])
            for i, j, v in pairs:
                max_diff = max(max_diff, abs(os_[i] - ts[j]))
                min_iou = min(min_iou, v)
            matched += len(pairs)
            mo = np.ones(len(ob), bool)
            mt = np.ones(len(tb), bool)
            for i, j, _ in pairs:
                mo[i] = False
                mt[j] = False
            unmatched += int(mo.sum() + mt.sum())
            unmatched_hi += int((os_[mo] > margin).sum() + (ts[mt] > margin).sum())
    within = max_diff <= tol["max_score_diff"] and min_iou >= tol["min_box_iou"] and unmatched_hi == 0
    status = "failed" if not within else "passed" if matched else "unverified"
    report = ParityReport(
        images=len(arrays), matched=matched, max_score_diff=round(max_diff, 6),
        min_box_iou=round(min_iou if matched else 0.0, 6), unmatched_above_margin=unmatched_hi,
        unmatched_total=unmatched, conf=conf, iou=iou, tolerance=tol, passed=status == "passed", status=status,
    )
    log.log(logging.INFO if status == "passed" else logging.WARNING, "parity check", extra=report.to_dict())
    return report
