"""Defect detector on ONNX Runtime: resize -> one batched run -> decode -> Detections.

Two model families, told apart by the ONNX file itself (Ultralytics' `head` metadata, else the
output shape), never by its name:
- YOLOv8 (`Detect` head): letterbox, output [b, 4+nc, N] (input-pixel cx, cy, w, h, class scores),
  per-class thresholds + per-class NMS.
- RT-DETR (`RTDETRDecoder` head): a square stretch to imgsz (Ultralytics' RTDETRPredictor uses
  LetterBox(scale_fill=True)), output [b, K, 6] (cx, cy, w, h normalised to the input, sigmoid
  score, class index; the top K query x class scores), per-class thresholds, no NMS.

Only onnxruntime, numpy and OpenCV: the serving side never imports torch or ultralytics.
"""

from __future__ import annotations

import ast
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from inference_workers.detections import Detection, Detections
from inference_workers.errors import InferenceError

if TYPE_CHECKING:
    import onnxruntime as ort


log = logging.getLogger(__name__)

__all__ = [
    "ARCH_RTDETR", "ARCH_YOLOV8", "Detection", "Detections", "Detector", "DetectorError", "LetterboxMeta", "Thresholds",
    "letterbox", "model_arch", "resolve_providers", "stretch",
]

PAD_VALUE = 114  # Ultralytics' letterbox grey
META_NAME = "sqis_model_name"
META_VERSION = "sqis_model_version"
ARCH_YOLOV8 = "yolov8"
ARCH_RTDETR = "rtdetr"
RESIZE = {ARCH_YOLOV8: "letterbox", ARCH_RTDETR: "stretch"}

_PROVIDER_ALIASES = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
}
_AUTO_ORDER = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


class DetectorError(InferenceError):
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

    @staticmethod
    def parse_per_class(values: str | Sequence[str] | None, flag: str = "--class-score") -> dict[str, float]:
        """Per-class thresholds as the worker and eval CLIs take them: repeatable, each NAME=SCORE or a
        comma-separated list of them ('scratch=0.4,dent=0.5'). ValueError names the flag and the part."""
        items = [values] if isinstance(values, str) else list(values or [])
        out: dict[str, float] = {}
        for part in (p for v in items for p in v.split(",")):
            if not part.strip():
                continue
            name, sep, val = part.partition("=")
            try:
                score = float(val)
            except ValueError:
                sep = ""
            if not sep or not name.strip():
                raise ValueError(f"{flag} {part!r}: expected NAME=SCORE, e.g. scratch=0.4")
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"{flag} {part!r}: SCORE must be within [0, 1]")
            out[name.strip()] = score
        return out

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


@dataclass(frozen=True)
class LetterboxMeta:
    """How one image was letterboxed: per-axis scale (resized / original) and (left, top) padding."""

    gain_x: float
    gain_y: float
    pad_x: float
    pad_y: float
    height: int
    width: int


@dataclass(frozen=True)
class PreparedFrame:
    """One frame's model input, made ahead of the infer stage: [3, h, w] tensor, letterbox, input key."""

    tensor: np.ndarray
    meta: LetterboxMeta
    key: tuple[int, int, str, str]


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


def stretch(img: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> tuple[np.ndarray, LetterboxMeta]:
    """Resize to size (h, w) ignoring aspect ratio (bilinear, no padding), as Ultralytics' RT-DETR
    predictor does (LetterBox with scale_fill=True). Writes into `out` when given."""
    h0, w0 = img.shape[:2]
    th, tw = size
    resized = img if (h0, w0) == (th, tw) else cv2.resize(img, (tw, th), interpolation=cv2.INTER_LINEAR)
    if out is None:
        out = np.ascontiguousarray(resized)
    else:
        out[...] = resized
    return out, LetterboxMeta(gain_x=tw / w0, gain_y=th / h0, pad_x=0.0, pad_y=0.0, height=h0, width=w0)


_RESIZERS = {"letterbox": letterbox, "stretch": stretch}


def model_arch(meta: Mapping[str, str], output_shape: Sequence[Any], nc: int | None) -> str:
    """The detector family of an ONNX model: Ultralytics' `head` metadata (RTDETRDecoder / Detect),
    else the output shape ([b, K, 6] with K != 4 + nc: RT-DETR; [b, 4+nc, N]: YOLOv8)."""
    head = str(meta.get("head") or "")
    if head == "RTDETRDecoder":
        return ARCH_RTDETR
    if head:
        return ARCH_YOLOV8
    shape = list(output_shape)
    if (len(shape) == 3 and shape[2] == 6 and isinstance(shape[1], int)
            and (nc is None or shape[1] != 4 + nc)):
        return ARCH_RTDETR
    return ARCH_YOLOV8


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
    """A YOLOv8 or RT-DETR ONNX model with its pre/post-processing; thread-compatible (one detect() at
    a time). `arch` says which (see the module docstring); everything it returns is the same."""

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
        self.arch: str = model_arch(meta, out_shape, len(names) if isinstance(names, dict | list) else None)
        self.resize: str = RESIZE[self.arch]
        if self.arch == ARCH_RTDETR and not isinstance(names, dict | list):
            raise DetectorError("RT-DETR model has no 'names' metadata (its output does not give the class count)")
        if isinstance(names, dict):
            self.class_names: list[str] = [str(names[k]) for k in sorted(names)]
        elif isinstance(names, list):
            self.class_names = [str(n) for n in names]
        elif isinstance(out_shape[1], int):
            self.class_names = [f"class{i}" for i in range(out_shape[1] - 4)]
        else:
            raise DetectorError("model has no 'names' metadata and a dynamic output width")
        # a YOLOv8-seg model adds nm mask coefficients per anchor and a prototype output (segment.py)
        outs = session.get_outputs()
        nm = outs[1].shape[1] if len(outs) > 1 and isinstance(outs[1].shape[1], int) else 0
        self._rows = 4 + len(self.class_names)
        if self.arch == ARCH_RTDETR:
            if len(out_shape) != 3 or out_shape[2] != 6 or len(outs) != 1:
                raise DetectorError(f"RT-DETR output has shape {out_shape}, expected [batch, queries, 6]")
        elif isinstance(out_shape[1], int) and out_shape[1] != self._rows + nm:
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
        return (f"Detector(name={self.name!r}, version={self.version!r}, arch={self.arch!r}, imgsz={self.imgsz}, "
                f"providers={self.providers})")

    # ---- stages (public so callers can time them) -----------------------------------------------
    @property
    def input_key(self) -> tuple[int, int, str, str]:
        """What a prepared frame depends on: the input size, dtype and resize (letterbox or stretch),
        not the weights, so a frame prepared for one model is valid for a hot-swapped one with the same key."""
        return (*self.imgsz, np.dtype(self._input_dtype).name, self.resize)

    def prepare_one(self, image: np.ndarray) -> PreparedFrame:
        """One image letterboxed into its [3, h, w] input tensor, exactly as :meth:`preprocess` does it.

        The worker runs this in its fetch threads, so the infer stage only stacks tensors and runs the
        model (see :meth:`batch_prepared`)."""
        h, w = self.imgsz
        canvas, meta = _RESIZERS[self.resize](_as_bgr(image), (h, w))
        tensor = canvas[..., ::-1].transpose(2, 0, 1).astype(self._input_dtype)  # BGR->RGB, HWC->CHW
        tensor *= self._input_dtype(1 / 255)
        return PreparedFrame(tensor, meta, self.input_key)

    def batch_prepared(self, prepared: Sequence[PreparedFrame | None]) -> tuple[np.ndarray, list[LetterboxMeta]] | None:
        """The model's input batch from prepared frames; None when any is missing or was prepared for
        another input size or dtype (the caller then runs :meth:`preprocess`)."""
        key = self.input_key
        if not prepared or any(p is None or p.key != key for p in prepared):
            return None
        return np.stack([p.tensor for p in prepared if p is not None]), [p.meta for p in prepared if p is not None]

    def preprocess(self, images: Sequence[np.ndarray]) -> tuple[np.ndarray, list[LetterboxMeta]]:
        """Letterbox (RT-DETR: stretch) each BGR image into one [b, 3, h, w] RGB float batch in [0, 1]."""
        h, w = self.imgsz
        canvas = np.empty((len(images), h, w, 3), dtype=np.uint8)
        metas = []
        resize = _RESIZERS[self.resize]
        for i, img in enumerate(images):
            _, m = resize(_as_bgr(img), (h, w), out=canvas[i])
            metas.append(m)
        batch = canvas[..., ::-1].transpose(0, 3, 1, 2).astype(self._input_dtype)  # BGR->RGB, NHWC->NCHW
        batch *= self._input_dtype(1 / 255)
        return np.ascontiguousarray(batch), metas

    def infer_all(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One forward pass: the head output [b, rows, N] as the model gives it (a YOLOv8-seg model adds
        its mask coefficients after the class rows) and, for a segmentation model, the prototypes
        [b, nm, h/4, w/4] (else None). A segmenting detector decodes boxes and masks from this one run."""
        fixed = self._fixed_batch
        if fixed is not None and batch.shape[0] != fixed:
            # a model exported with a fixed batch size: run chunks of exactly that size, the last one padded
            outs, protos = [], []
            for i in range(0, batch.shape[0], fixed):
                chunk = batch[i:i + fixed]
                n = chunk.shape[0]
                if n < fixed:
                    chunk = np.concatenate([chunk, np.zeros((fixed - n, *chunk.shape[1:]), dtype=chunk.dtype)])
                out = self.session.run(None, {self._input_name: chunk})
                outs.append(out[0][:n])
                if len(out) > 1:
                    protos.append(out[1][:n])
            return (np.concatenate(outs, 0).astype(np.float32, copy=False),
                    np.concatenate(protos, 0) if protos else None)
        out = self.session.run(None, {self._input_name: batch})
        return out[0].astype(np.float32, copy=False), (out[1] if len(out) > 1 else None)

    def infer(self, batch: np.ndarray) -> np.ndarray:
        """Raw model output (float32): YOLOv8 [b, 4+nc, N], RT-DETR [b, K, 6]."""
        return self.boxes_of(self.infer_all(batch)[0])

    def boxes_of(self, raw: np.ndarray) -> np.ndarray:
        """The box and class part of a head output from :meth:`infer_all` (YOLOv8: the rows [b, 4+nc, N]
        without mask coefficients; RT-DETR: all of [b, K, 6])."""
        return raw if self.arch == ARCH_RTDETR else raw[:, :self._rows]

    def postprocess(self, raw: np.ndarray, metas: Sequence[LetterboxMeta]) -> list[Detections]:
        """Decode, per-class threshold (+ NMS for YOLOv8), and map boxes back to original pixels (clipped)."""
        if self.arch == ARCH_RTDETR:
            return [Detections.from_rtdetr_output(pred, self._class_thr, self.imgsz, class_names=self.class_names,
                                                  letterbox=m, max_det=self.max_det)
                    for pred, m in zip(raw, metas, strict=True)]
        return [Detections.from_onnx_output(pred, self._class_thr, self.thresholds.iou, class_names=self.class_names,
                                            letterbox=m, max_det=self.max_det)
                for pred, m in zip(raw, metas, strict=True)]

    def max_raw_scores(self, raw: np.ndarray) -> np.ndarray:
        """Per image, the highest class score of any anchor (RT-DETR: query) before thresholds (drift:
        model confidence)."""
        if self.arch == ARCH_RTDETR:
            return raw[:, :, 4].max(axis=1) if raw.shape[1] else np.zeros(raw.shape[0], np.float32)
        return raw[:, 4:, :].max(axis=(1, 2)) if raw.shape[1] > 4 else np.zeros(raw.shape[0], np.float32)

    def detect(self, images: Sequence[np.ndarray]) -> list[Detections]:
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


def _openvino_session(path: str | os.PathLike[str], threads: int) -> ort.InferenceSession:
    from inference_workers.openvino_session import OpenVINOSession

    try:
        return OpenVINOSession(path, threads)  # type: ignore[return-value]  # duck-typed: run/get_inputs/...
    except ImportError as exc:
        raise DetectorError(str(exc)) from None
    except Exception as exc:  # openvino raises RuntimeError for unreadable or unsupported models
        raise DetectorError(f"cannot load ONNX model {path} on OpenVINO: {exc}") from exc


def provider_options(providers: Sequence[str], *, fp16: bool = False, engine_cache_dir: str | os.PathLike[str] | None = None,
                     device_id: int = 0) -> list[tuple[str, dict[str, Any]]]:
    """(provider, options) for ONNX Runtime: TensorRT with an engine cache (building an engine takes
    minutes; the cache makes it once per model, GPU and TensorRT version) and optional fp16, CUDA on
    a device with a bounded arena, CPU as is."""
    out: list[tuple[str, dict[str, Any]]] = []
    for p in providers:
        if p == "TensorrtExecutionProvider":
            opts: dict[str, Any] = {"device_id": device_id, "trt_fp16_enable": bool(fp16),
                                    "trt_max_workspace_size": 2 * 1024**3}
            if engine_cache_dir is not None:
                Path(engine_cache_dir).mkdir(parents=True, exist_ok=True)
                opts |= {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(engine_cache_dir),
                         "trt_timing_cache_enable": True, "trt_timing_cache_path": str(engine_cache_dir)}
            out.append((p, opts))
        elif p == "CUDAExecutionProvider":
            out.append((p, {"device_id": device_id, "arena_extend_strategy": "kSameAsRequested",
                            "cudnn_conv_algo_search": "HEURISTIC"}))
        else:
            out.append((p, {}))
    return out


def make_session(path: str | os.PathLike[str], providers: str = "auto", threads: int = 0, *, fp16: bool = False,
                 engine_cache_dir: str | os.PathLike[str] | None = None, device_id: int = 0) -> ort.InferenceSession:
    """An ONNX Runtime session for the model file with the chosen providers (and their GPU options);
    providers 'openvino': the OpenVINO runtime behind the same interface (inference_workers/openvino_session.py)."""
    import onnxruntime as ort

    if providers.strip().lower() == "openvino":
        return _openvino_session(path, threads)

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 0:
        opts.intra_op_num_threads = threads
    # Idle intra-op threads would otherwise spin and steal the CPU from the fetch/decode threads and
    # the Kafka client that share the machine with the worker.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    try:
        chosen = provider_options(resolve_providers(providers), fp16=fp16, engine_cache_dir=engine_cache_dir,
                                  device_id=device_id)
        return ort.InferenceSession(str(path), sess_options=opts, providers=[n for n, _ in chosen],
                                    provider_options=[o for _, o in chosen])
    except DetectorError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types (InvalidProtobuf, NoSuchFile, ...)
        raise DetectorError(f"cannot load ONNX model {path}: {exc}") from exc
