"""YOLOv8 defect detector on ONNX Runtime: letterbox -> one batched run -> decode -> per-class NMS.

Only onnxruntime, numpy and OpenCV: the serving side never imports torch or ultralytics.
"""

from __future__ import annotations

import ast
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from inference_workers.nms import decode_yolov8

if TYPE_CHECKING:
    import onnxruntime as ort

    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "Detection", "Detector", "DetectorError", "LetterboxMeta", "Thresholds", "letterbox", "load_detector",
    "resolve_providers",
]

PAD_VALUE = 114  # Ultralytics' letterbox grey
META_NAME = "sqis_model_name"
META_VERSION = "sqis_model_version"

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class DetectorError(RuntimeError):
    """The model cannot be loaded or run (bad file, missing provider, unexpected output)."""


@dataclass(frozen=True)
class Thresholds:
    """Score thresholds (a default and per class name) and the NMS IoU threshold.

    image_score: when set (a calibrated operating point), the image-level decision: a frame FAILs when
    its top detection score reaches it. source: where the thresholds came from ('settings', 'cli',
    'calibrated:models:/NAME/VERSION', 'calibrated:file:PATH'); both go into every Inspection.
    """

    default_score: float = 0.25
    iou: float = 0.45
    per_class: Mapping[str, float] = field(default_factory=dict)
    image_score: float | None = None
    source: str = "settings"

    def __post_init__(self) -> None:
        checked = [("default_score", self.default_score), ("iou", self.iou), *self.per_class.items()]
        if self.image_score is not None:
            checked.append(("image_score", self.image_score))
        for name, v in checked:
            if not 0.0 <= float(v) <= 1.0:
                raise ValueError(f"threshold {name}={v} is not within [0, 1]")
        object.__setattr__(self, "per_class", {str(k): float(v) for k, v in self.per_class.items()})

    def score_for(self, class_name: str) -> float:
        return float(self.per_class.get(class_name, self.default_score))

    def to_avro(self) -> dict[str, Any]:
        """The Inspection record's 'thresholds' field."""
        return {"default_score": float(self.default_score), "iou": float(self.iou), "per_class": dict(self.per_class),
                "source": self.source,
                "image_score": None if self.image_score is None else float(self.image_score)}

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored with a model version (see training/calibrate.py)."""
        return self.to_avro()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> Thresholds:
        img = d.get("image_score")
        return cls(default_score=float(d.get("default_score", 0.25)), iou=float(d.get("iou", 0.45)),
                   per_class={str(k): float(v) for k, v in (d.get("per_class") or {}).items()},
                   image_score=None if img is None else float(img), source=source or str(d.get("source") or "file"))


@dataclass
class Detection:
    """One detected defect; box in original-image pixels (x1, y1, x2, y2)."""

    class_id: int
    class_name: str
    score: float
    x1: float
    y1: float
    x2: float
    y2: float

    @property
    def xyxy(self) -> tuple[float, float, float, float]:
        return (self.x1, self.y1, self.x2, self.y2)

    def to_avro(self, mask: dict[str, Any] | None = None) -> dict[str, Any]:
        """An Inspection 'detections' item."""
        return {
            "class_id": self.class_id, "class_name": self.class_name, "score": self.score,
            "x1": self.x1, "y1": self.y1, "x2": self.x2, "y2": self.y2, "mask": mask,
        }


@dataclass(frozen=True)
class LetterboxMeta:
    """How one image was letterboxed: per-axis scale (resized / original) and (left, top) padding."""

    gain_x: float
    gain_y: float
    pad_x: float
    pad_y: float
    height: int
    width: int


def letterbox(img: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> tuple[np.ndarray, LetterboxMeta]:
    """Resize keeping aspect ratio and pad to size (h, w) with grey 114, centred, as Ultralytics does.

    Writes into `out` (an [h, w, 3] uint8 view) when given.
    """
    h0, w0 = img.shape[:2]
    th, tw = size
    r = min(th / h0, tw / w0)
    nw, nh = max(round(w0 * r), 1), max(round(h0 * r), 1)
    left, top = round((tw - nw) / 2 - 0.1), round((th - nh) / 2 - 0.1)
    if out is None:
        out = np.full((th, tw, 3), PAD_VALUE, dtype=np.uint8)
    else:
        out[...] = PAD_VALUE
    resized = img if (nw, nh) == (w0, h0) else cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    out[top:top + nh, left:left + nw] = resized
    # per-axis gains of the rounded size map boxes back exactly as Ultralytics' scale_boxes does
    return out, LetterboxMeta(gain_x=nw / w0, gain_y=nh / h0, pad_x=float(left), pad_y=float(top), height=h0, width=w0)


def _as_bgr(img: np.ndarray) -> np.ndarray:
    if img.dtype != np.uint8:
        raise DetectorError(f"expected uint8 images, got {img.dtype}")
    if img.ndim == 2 or (img.ndim == 3 and img.shape[2] == 1):
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    if img.ndim == 3 and img.shape[2] == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2BGR)
    if img.ndim != 3 or img.shape[2] != 3:
        raise DetectorError(f"expected an HxWx3 BGR image, got shape {img.shape}")
    return img


def resolve_providers(spec: str) -> list[str]:
    """'auto' -> TensorRT/CUDA when this onnxruntime build has them, else CPU; or a comma list."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if spec.strip().lower() == "auto":
        return [p for p in _AUTO_ORDER if p in available] or ["CPUExecutionProvider"]
    wanted = [_PROVIDER_ALIASES.get(p.strip().lower(), p.strip()) for p in spec.split(",") if p.strip()]
    missing = [p for p in wanted if p not in available]
    if missing:
        raise DetectorError(f"ONNX Runtime providers {missing} are not available (this build has {available})")
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")  # fallback for ops the accelerator lacks
    return wanted


def _parse_meta(value: str | None) -> Any:
    if value is None:
        return None
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


class Detector:
    """A YOLOv8 ONNX model with its pre/post-processing; thread-compatible (one detect() at a time)."""

    def __init__(
        self, session: ort.InferenceSession, thresholds: Thresholds | None = None, *, name: str | None = None,
        version: str | None = None, max_det: int = 300, path: str | None = None,
    ) -> None:
        self.session = session
        self.thresholds = thresholds or Thresholds()
        self.max_det = max_det
        self.path = path
        meta = session.get_modelmeta().custom_metadata_map
        inp = session.get_inputs()[0]
        self._input_name = inp.name
        self._input_dtype = np.float16 if "float16" in inp.type else np.float32
        shape = list(inp.shape)  # [batch, 3, h, w]; symbolic dims are strings/None
        self._fixed_batch = shape[0] if isinstance(shape[0], int) else None
        imgsz = _parse_meta(meta.get("imgsz"))
        if isinstance(imgsz, int):
            imgsz = [imgsz, imgsz]
        if not (isinstance(imgsz, list | tuple) and len(imgsz) == 2):
            if isinstance(shape[2], int) and isinstance(shape[3], int):
                imgsz = [shape[2], shape[3]]
            else:
                raise DetectorError("model has neither 'imgsz' metadata nor a fixed input size")
        self.imgsz: tuple[int, int] = (int(imgsz[0]), int(imgsz[1]))
        self.stride = int(_parse_meta(meta.get("stride")) or 32)
        names = _parse_meta(meta.get("names"))
        out_shape = session.get_outputs()[0].shape
        if isinstance(names, dict):
            self.class_names: list[str] = [str(names[k]) for k in sorted(names)]
        elif isinstance(names, list):
            self.class_names = [str(n) for n in names]
        elif isinstance(out_shape[1], int):
            self.class_names = [f"class{i}" for i in range(out_shape[1] - 4)]
        else:
            raise DetectorError("model has no 'names' metadata and a dynamic output width")
        if isinstance(out_shape[1], int) and out_shape[1] != 4 + len(self.class_names):
            raise DetectorError(f"output has {out_shape[1]} rows, expected 4 + {len(self.class_names)} classes")
        stem = Path(path).stem if path else "model"
        self.name: str = name or str(meta.get(META_NAME) or stem)
        self.version: str = version or str(meta.get(META_VERSION) or "0")
        self.providers: list[str] = list(session.get_providers())
        self._class_thr = self._class_threshold_array(self.thresholds)

    # ---- configuration ------------------------------------------------------------------------
    def _class_threshold_array(self, t: Thresholds) -> np.ndarray:
        unknown = set(t.per_class) - set(self.class_names)
        if unknown:
            raise DetectorError(f"per-class thresholds for unknown classes {sorted(unknown)}; model has {self.class_names}")
        return np.array([t.score_for(n) for n in self.class_names], dtype=np.float32)

    def with_thresholds(self, thresholds: Thresholds) -> Detector:
        """A detector sharing this ONNX session with other thresholds (e.g. conf 0.001 for mAP)."""
        d = Detector.__new__(Detector)
        d.__dict__.update(self.__dict__)
        d.thresholds = thresholds
        d._class_thr = self._class_threshold_array(thresholds)
        return d

    def __repr__(self) -> str:
        return f"Detector(name={self.name!r}, version={self.version!r}, imgsz={self.imgsz}, providers={self.providers})"

    # ---- stages (public so callers can time them) -----------------------------------------------
    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxMeta]]:
        """Letterbox each BGR image into one [b, 3, h, w] RGB float batch in [0, 1]."""
        h, w = self.imgsz
        canvas = np.empty((len(images), h, w, 3), dtype=np.uint8)
        metas = []
        for i, img in enumerate(images):
            _, m = letterbox(_as_bgr(img), (h, w), out=canvas[i])
            metas.append(m)
        batch = canvas[..., ::-1].transpose(0, 3, 1, 2).astype(self._input_dtype)  # BGR->RGB, NHWC->NCHW
        batch *= self._input_dtype(1 / 255)
        return np.ascontiguousarray(batch), metas

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output [b, 4+nc, N] (float32)."""
        fixed = self._fixed_batch
        if fixed is not None and batch.shape[0] != fixed:
            # a model exported with a fixed batch size: run chunks of exactly that size, the last one padded
            outs = []
            for i in range(0, batch.shape[0], fixed):
                chunk = batch[i:i + fixed]
                n = chunk.shape[0]
                if n < fixed:
                    chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), dtype=chunk.dtype)])
                outs.append(self.session.run(None, {self._input_name: chunk})[0][:n])
            return np.concatenate(outs, 0).astype(np.float32, copy=False)
        return self.session.run(None, {self._input_name: batch})[0].astype(np.float32, copy=False)

    def postprocess(self, raw: np.ndarray, metas: Sequence[LetterboxMeta]) -> list[list[Detection]]:
        """Decode, per-class threshold + NMS, and map boxes back to original pixels (clipped)."""
        out: list[list[Detection]] = []
        for pred, m in zip(raw, metas, strict=True):
            dec = decode_yolov8(pred, self._class_thr, self.thresholds.iou, max_det=self.max_det)
            boxes = dec.boxes.astype(np.float64)
            boxes[:, [0, 2]] = np.clip((boxes[:, [0, 2]] - m.pad_x) / m.gain_x, 0, m.width)
            boxes[:, [1, 3]] = np.clip((boxes[:, [1, 3]] - m.pad_y) / m.gain_y, 0, m.height)
            names = self.class_names
            out.append([
                Detection(int(c), names[int(c)], float(s), float(b[0]), float(b[1]), float(b[2]), float(b[3]))
                for b, s, c in zip(boxes, dec.scores, dec.class_ids, strict=True)
            ])
        return out

    def detect(self, images: Sequence[np.ndarray]) -> list[list[Detection]]:
        """Detections for each image (HxWx3 BGR uint8, any size), in one batched ONNX run."""
        if len(images) == 0:
            return []
        batch, metas = self.preprocess(images)
        raw = self.infer(batch)
        return self.postprocess(raw, metas)

    def warmup(self, batch_size: int = 1) -> None:
        """Run once on grey images so the first real batch does not pay for lazy initialisation."""
        h, w = self.imgsz
        self.detect([np.full((h, w, 3), PAD_VALUE, np.uint8)] * batch_size)


def make_session(path: str | os.PathLike[str], providers: str = "auto", threads: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session for the model file with the chosen providers and intra-op threads."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    # Idle intra-op threads would otherwise spin and steal the CPU from the fetch/decode threads and
    # the Kafka client that share the machine with the worker.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=resolve_providers(providers))
    except DetectorError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, NoSuchFile, ...)
        raise DetectorError(f"cannot load ONNX model {path}: {exc}") from exc


def load_detector(
    settings: Settings, model_uri: str, thresholds: Thresholds | None = None, *, max_det: int = 300,
) -> Detector:
    """A Detector for a local .onnx path or an MLflow URI (models:/NAME@alias, models:/NAME/VERSION).

    thresholds None: the model's calibrated operating point (`sqis calibrate`) if it has one, else defaults.
    """
    name = version = None
    if model_uri.startswith(("models:/", "runs:/")):
        from inference_workers.model_loader import resolve_model

        resolved = resolve_model(settings, model_uri)
        path, name, version = resolved.path, resolved.name, resolved.version
    else:
        path = Path(model_uri.removeprefix("file://")).expanduser()
        if not path.is_file():
            raise DetectorError(f"model file {path} does not exist")
    if thresholds is None:
        from inference_workers.model_loader import default_thresholds

        try:
            thresholds = default_thresholds(settings, model_uri, name, version, path)
        except DetectorError:
            raise
        except Exception as exc:  # registry errors
            raise DetectorError(f"cannot read the calibrated thresholds of {model_uri}: {exc}") from exc
    t0 = time.perf_counter()
    session = make_session(path, settings.onnx_providers, settings.onnx_threads)
    det = Detector(session, thresholds, name=name, version=version, max_det=max_det, path=str(path))
    log.info(
        "detector loaded",
        extra={"model_uri": model_uri, "model_name": det.name, "model_version": det.version, "imgsz": det.imgsz,
               "providers": det.providers, "thresholds_source": thresholds.source, "load_ms": round((time.perf_counter() - t0) * 1000, 1)},
    )
    return det
