"""Segmentation stage: a mask per detected box, from SAM (box-prompted) or a YOLOv8-seg model.

Serving runs on ONNX Runtime + numpy + OpenCV only (no torch). Two segmenters share one interface:

    Segmenter.segment(image: HxWx3 BGR uint8, boxes_xyxy: [N, 4], class_ids: [N]) -> list of HxW bool

- SamSegmenter: the image encoder runs ONCE per image, then ONE batched prompt-decoder call decodes all
  of that image's boxes (never an encoder pass per box). Files from `sqis sam export` (encoder.onnx,
  decoder.onnx, sam.json): any segment-anything-compatible checkpoint (vit_b / vit_l / vit_h, MobileSAM
  through its own exporter with the same input names) plugs in.
- YoloSegSegmenter: a YOLOv8-seg ONNX (`sqis train --task segment`): masks = sigmoid(coeffs @ protos),
  cropped to the box and upsampled to the frame. For each requested box it takes the coefficients of
  the anchor whose predicted box overlaps it best (so it also refines boxes from another detector).

Mask outputs (COCO RLE, pixel area, outline polygon, longest extent, per-frame label image) are
helpers here too: mask_record(), mask_polygon(), label_image().
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import cv2
import numpy as np

from inference_workers.detector import (
    DetectorError,
    LetterboxMeta,
    _as_bgr,
    _parse_meta,
    letterbox,
    make_session,
)
from inference_workers.nms import box_iou, xywh2xyxy

if TYPE_CHECKING:
    import onnxruntime as ort

    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "SEGMENTERS", "MaskInfo", "SamSegmenter", "Segmenter", "YoloSegSegmenter", "crop_mask", "decode_yolo_masks", "draw_inspection",
    "label_image", "load_segmenter", "mask_iou", "mask_length_px", "mask_polygon", "mask_record", "rle_decode",
    "rle_encode", "sam_preprocess",
]

SEGMENTERS = ("none", "sam", "yolo-seg")
SAM_MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # RGB, segment-anything's pixel_mean
SAM_STD = np.array([58.395, 57.12, 57.375], np.float32)


@runtime_checkable
class Segmenter(Protocol):
    """Masks for boxes of one image; masks[i] is an HxW bool array for boxes_xyxy[i]."""

    name: str

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray, class_ids: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        ...


# ---- mask encodings --------------------------------------------------------------------------------
def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """COCO *uncompressed* RLE of an HxW mask: column-major run lengths starting with a run of zeros
    (the Inspection's detection.mask). pycocotools reads it back with frPyObjects (see rle_decode)."""
    m = np.asarray(mask, dtype=bool)
    h, w = m.shape
    flat = m.reshape(-1, order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).astype(np.int64).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"height": int(h), "width": int(w), "counts": [int(c) for c in counts], "area": int(m.sum())}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """HxW bool mask of an uncompressed (or compressed) COCO RLE, decoded by pycocotools."""
    from pycocotools import mask as mask_utils

    h, w = int(rle.get("height", rle.get("size", [0, 0])[0])), int(rle.get("width", rle.get("size", [0, 0])[1]))
    counts = rle["counts"]
    coco = mask_utils.frPyObjects({"size": [h, w], "counts": list(counts)}, h, w) if isinstance(counts, list) else {
        "size": [h, w], "counts": counts}
    return mask_utils.decode(coco).astype(bool)


def mask_polygon(mask: np.ndarray, epsilon: float = 1.0) -> list[float]:
    """Outline of the largest connected part as x0,y0,x1,y1,... (cv2.findContours, simplified to
    within `epsilon` px by approxPolyDP); empty for an empty mask."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    c = max(contours, key=cv2.contourArea)
    if epsilon > 0 and len(c) > 4:
        c = cv2.approxPolyDP(c, epsilon, True)
    return [float(v) for v in c.reshape(-1, 2).reshape(-1)]


def mask_length_px(mask: np.ndarray) -> float:
    """Longest extent of the mask (maximum Feret diameter, pixel centres, +1 px for the pixel size).

    The hull of the outer contours' vertices is the hull of all the mask's pixel centres (extreme
    points lie on the boundary; CHAIN_APPROX_SIMPLE keeps the ends of every straight run), so this
    costs the boundary, not the area."""
    contours, _ = cv2.findContours(np.ascontiguousarray(mask, dtype=np.uint8), cv2.RETR_EXTERNAL,
                                   cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return 0.0
    pts = np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float32)
    hull = cv2.convexHull(pts).reshape(-1, 2).astype(np.float64)
    if len(hull) < 2:
        return 1.0
    d = np.sqrt(((hull[:, None, :] - hull[None, :, :]) ** 2).sum(-1)).max()
    return float(d) + 1.0


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two bool masks (1.0 when both are empty)."""
    inter = np.logical_and(a, b).sum()
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(inter) / float(union)


@dataclass(frozen=True)
class MaskInfo:
    """What an Inspection detection carries about its mask."""

    rle: dict[str, Any]
    polygon: list[float]
    area_px: int
    length_px: float


def mask_record(mask: np.ndarray) -> MaskInfo:
    m = np.asarray(mask, dtype=bool)
    rle = rle_encode(m)
    return MaskInfo(rle=rle, polygon=mask_polygon(m), area_px=int(rle["area"]), length_px=mask_length_px(m))


def label_image(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """Per-frame label image (uint16, pixel = detection index + 1, 0 = background; later detections
    overwrite earlier ones where masks overlap)."""
    out = np.zeros((height, width), np.uint16)
    for i, m in enumerate(masks):
        out[np.asarray(m, dtype=bool)] = i + 1
    return out


def encode_label_png(labels: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", labels)
    if not ok:
        raise ValueError("cannot encode the label image as PNG")
    return buf.tobytes()


# ---- YOLOv8-seg ------------------------------------------------------------------------------------
def crop_mask(masks: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Zero each mask [n, h, w] outside its xyxy box (in that mask's pixel coordinates)."""
    n, h, w = masks.shape
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    r = np.arange(w, dtype=np.float32)[None, None, :]
    c = np.arange(h, dtype=np.float32)[None, :, None]
    return masks * ((r >= x1) & (r < x2) & (c >= y1) & (c < y2))


def decode_yolo_masks(coeffs: np.ndarray, protos: np.ndarray, boxes_in: np.ndarray, meta: LetterboxMeta,
                      input_hw: tuple[int, int], threshold: float = 0.5) -> np.ndarray:
    """Masks [n, H, W] bool in frame pixels from a YOLOv8-seg head.

    coeffs [n, nm], protos [nm, ph, pw], boxes_in [n, 4] xyxy in letterboxed-input pixels. Mask =
    sigmoid(coeffs @ protos) sampled (bilinear) at each frame pixel's place in the prototypes (letterbox
    padding removed), cropped to the box and thresholded, as Ultralytics' native (retina) masks.
    """
    n = len(coeffs)
    if n == 0:
        return np.zeros((0, meta.height, meta.width), bool)
    nm, ph, pw = protos.shape
    ih, iw = input_hw
    # in float64: products of small float32 coefficients and prototypes fall into float32's subnormal
    # range (seen with untrained heads), which makes a float32 product hundreds of times slower
    logits = (coeffs.astype(np.float64) @ protos.reshape(nm, -1).astype(np.float64)).astype(np.float32)
    logits = logits.reshape(n, ph, pw)
    out = np.zeros((n, meta.height, meta.width), bool)
    top, left = int(round(meta.pad_y)), int(round(meta.pad_x))
    bottom = top + int(round(meta.height * meta.gain_y))
    right = left + int(round(meta.width * meta.gain_x))
    # Each mask is evaluated only around its box, in frame pixels: a frame pixel's position in the input
    # (letterbox padding removed) and in the prototypes, one bilinear sample of the mask logits there
    # (cv2.remap), the box crop, and sigmoid > threshold as logit > log(t / (1 - t)). The cost follows
    # the box's area; no input-size or frame-size array per mask.
    sx, sy = (right - left) / meta.width, (bottom - top) / meta.height
    fx = (boxes_in[:, [0, 2]] - meta.pad_x) / meta.gain_x
    fy = (boxes_in[:, [1, 3]] - meta.pad_y) / meta.gain_y
    cut = float(np.log(threshold / (1.0 - threshold)))
    for i in range(n):
        u0, u1 = max(int(np.floor(fx[i, 0])) - 2, 0), min(int(np.ceil(fx[i, 1])) + 2, meta.width)
        v0, v1 = max(int(np.floor(fy[i, 0])) - 2, 0), min(int(np.ceil(fy[i, 1])) + 2, meta.height)
        if u1 <= u0 or v1 <= v0:
            continue
        xs = np.clip((np.arange(u0, u1) + 0.5) * sx - 0.5, 0, right - left - 1) + left
        ys = np.clip((np.arange(v0, v1) + 0.5) * sy - 0.5, 0, bottom - top - 1) + top
        px = ((xs + 0.5) * (pw / iw) - 0.5).astype(np.float32)
        py = ((ys + 0.5) * (ph / ih) - 0.5).astype(np.float32)
        mx, my = np.meshgrid(px, py)
        lg = cv2.remap(logits[i], mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        b = boxes_in[i]
        inside = ((xs >= b[0]) & (xs < b[2]))[None, :] & ((ys >= b[1]) & (ys < b[3]))[:, None]
        out[i, v0:v1, u0:u1] = (lg > cut) & inside
    return out


class YoloSegSegmenter:
    """Masks from a YOLOv8-seg ONNX model (outputs [b, 4+nc+nm, N] and protos [b, nm, h/4, w/4])."""

    def __init__(self, session: ort.InferenceSession, *, path: str | None = None, threshold: float = 0.5,
                 min_anchor_iou: float = 0.3) -> None:
        self.session = session
        outs = session.get_outputs()
        if len(outs) < 2:
            raise DetectorError(f"{path or 'model'} is not a segmentation model (needs a prototype output)")
        meta = session.get_modelmeta().custom_metadata_map
        imgsz = _parse_meta(meta.get("imgsz"))
        if isinstance(imgsz, int):
            imgsz = [imgsz, imgsz]
        if not (isinstance(imgsz, list | tuple) and len(imgsz) == 2):
            raise DetectorError("yolo-seg model has no 'imgsz' metadata")
        self.imgsz: tuple[int, int] = (int(imgsz[0]), int(imgsz[1]))
        names = _parse_meta(meta.get("names"))
        self.num_classes = len(names) if isinstance(names, dict | list) else None
        nm = outs[1].shape[1]
        self.num_coeffs = int(nm) if isinstance(nm, int) else 32
        self.threshold = threshold
        self.min_anchor_iou = min_anchor_iou
        self._input = session.get_inputs()[0].name
        self.path = path
        self.name = f"yolo-seg:{meta.get('sqis_model_name') or Path(path or 'model').stem}@{meta.get('sqis_model_version') or '0'}"

    def run(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray, LetterboxMeta]:
        """Raw head output [4+nc+nm, N] and protos [nm, ph, pw] for one BGR image, with its letterbox."""
        canvas, meta = letterbox(_as_bgr(image), self.imgsz)
        x = np.ascontiguousarray(canvas[..., ::-1].transpose(2, 0, 1)[None], dtype=np.float32) / np.float32(255)
        pred, protos = self.session.run(None, {self._input: x})[:2]
        return pred[0], protos[0], meta

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray, class_ids: np.ndarray | Sequence[int],
                scores: np.ndarray | Sequence[float] | None = None) -> list[np.ndarray]:
        """Masks for the boxes; with `scores` (the detector's, when it is this model) each box finds the
        exact anchor it came from (same clipped box, class and score)."""
        if len(np.asarray(boxes_xyxy).reshape(-1, 4)) == 0:
            return []
        pred, protos, meta = self.run(image)
        return self.masks_for(pred, protos, meta, boxes_xyxy, class_ids, scores)

    def masks_for(self, pred: np.ndarray, protos: np.ndarray, meta: LetterboxMeta, boxes_xyxy: np.ndarray,
                  class_ids: np.ndarray | Sequence[int], scores: np.ndarray | Sequence[float] | None = None,
                  ) -> list[np.ndarray]:
        """The masks of the boxes from one image's raw head output and prototypes (see run())."""
        boxes = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
        h, w = meta.height, meta.width
        nm = protos.shape[0]
        nc = pred.shape[0] - 4 - nm
        anchors = xywh2xyxy(pred[:4].T.astype(np.float64))
        # anchors clipped to the frame's area of the letterboxed input, as the detector clips its boxes
        anchors[:, [0, 2]] = np.clip(anchors[:, [0, 2]], meta.pad_x, meta.pad_x + w * meta.gain_x)
        anchors[:, [1, 3]] = np.clip(anchors[:, [1, 3]], meta.pad_y, meta.pad_y + h * meta.gain_y)
        cls = np.clip(np.asarray(class_ids, np.int64).reshape(-1), 0, max(nc - 1, 0))
        cls_scores = pred[4:4 + nc][cls]  # [n, N]: each box's class score at every anchor
        boxes_in = boxes.copy()
        boxes_in[:, [0, 2]] = boxes[:, [0, 2]] * meta.gain_x + meta.pad_x
        boxes_in[:, [1, 3]] = boxes[:, [1, 3]] * meta.gain_y + meta.pad_y
        ious = box_iou(boxes_in, anchors)  # [n, N]
        if scores is not None:  # overlap and score agreement: the anchor the detection came from
            cost = ious - 10.0 * np.abs(cls_scores - np.asarray(scores, np.float64).reshape(-1, 1))
        else:  # overlap first, confidence breaks near-ties
            cost = ious * (0.5 + cls_scores)
        best = np.argmax(cost, axis=1)
        coeffs = pred[4 + nc:, best].T
        masks = decode_yolo_masks(coeffs, protos, boxes_in, meta, self.imgsz, self.threshold)
        out = []
        for i, m in enumerate(masks):
            if ious[i, best[i]] < self.min_anchor_iou:  # no anchor covers this box: box-shaped fallback
                m = np.zeros((h, w), bool)
                x1, y1, x2, y2 = np.round(boxes[i]).astype(int)
                m[max(y1, 0):max(y2, 0), max(x1, 0):max(x2, 0)] = True
            out.append(m)
        return out


# ---- SAM -------------------------------------------------------------------------------------------
def sam_preprocess(image: np.ndarray, img_size: int) -> tuple[np.ndarray, float]:
    """BGR uint8 -> the SAM encoder's input [1, 3, S, S] (longest side resized to S, normalised, padded
    bottom-right) and the resize scale."""
    rgb = cv2.cvtColor(_as_bgr(image), cv2.COLOR_BGR2RGB)
    h, w = rgb.shape[:2]
    scale = img_size / max(h, w)
    nh, nw = int(h * scale + 0.5), int(w * scale + 0.5)
    resized = cv2.resize(rgb, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) else rgb
    x = np.zeros((img_size, img_size, 3), np.float32)
    x[:nh, :nw] = (resized.astype(np.float32) - SAM_MEAN) / SAM_STD
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None]), scale


class SamSegmenter:
    """Box-prompted SAM on ONNX Runtime: encoder once per image, one batched decoder call per image."""

    def __init__(self, encoder: ort.InferenceSession, decoder: ort.InferenceSession, *, img_size: int = 1024,
                 mask_input_size: int = 256, name: str = "sam", mask_threshold: float = 0.0) -> None:
        self.encoder, self.decoder = encoder, decoder
        self.img_size = img_size
        self.mask_input_size = mask_input_size
        self.mask_threshold = mask_threshold
        self.name = name
        self._enc_input = encoder.get_inputs()[0].name
        self.last_timings: dict[str, float] = {}

    @classmethod
    def from_dir(cls, model_dir: Path | str, providers: str = "auto", threads: int = 0) -> SamSegmenter:
        d = Path(model_dir)
        info_path = d / "sam.json"
        if not info_path.is_file():
            raise DetectorError(f"{d}: no sam.json (export a checkpoint with `sqis sam export`)")
        info = json.loads(info_path.read_text())
        enc = make_session(d / "encoder.onnx", providers, threads)
        dec = make_session(d / "decoder.onnx", providers, threads)
        return cls(enc, dec, img_size=int(info["img_size"]), mask_input_size=int(info["mask_input_size"]),
                   name=f"sam:{info.get('type', 'sam')}@{str(info.get('checkpoint_sha256') or '')[:12] or 'random'}")

    def encode(self, image: np.ndarray) -> tuple[np.ndarray, float]:
        x, scale = sam_preprocess(image, self.img_size)
        return self.encoder.run(None, {self._enc_input: x})[0], scale

    def decode(self, embedding: np.ndarray, scale: float, boxes_xyxy: np.ndarray, height: int, width: int) -> np.ndarray:
        """Mask logits [n, H, W] for n boxes in ONE decoder call (boxes as corner prompts, labels 2 and 3)."""
        return self.postprocess(self.decode_low_res(embedding, scale, boxes_xyxy, height, width), height, width)

    def decode_low_res(self, embedding: np.ndarray, scale: float, boxes_xyxy: np.ndarray, height: int,
                       width: int) -> np.ndarray:
        """The decoder's low-resolution mask logits [n, m, m] for n boxes, in one batched call."""
        boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
        n = len(boxes)
        # per-axis scale of the rounded resized size, as segment-anything's ResizeLongestSide.apply_coords
        nh, nw = int(height * scale + 0.5), int(width * scale + 0.5)
        coords = (boxes.reshape(n, 2, 2) * np.array([nw / width, nh / height], np.float32)).astype(np.float32)
        feeds = {
            "image_embeddings": embedding.astype(np.float32),
            "point_coords": coords,
            "point_labels": np.tile(np.array([[2, 3]], np.float32), (n, 1)),
            "mask_input": np.zeros((n, 1, self.mask_input_size, self.mask_input_size), np.float32),
            "has_mask_input": np.zeros(1, np.float32),
        }
        return self.decoder.run(["low_res_masks"], feeds)[0][:, 0]

    def postprocess(self, low_res: np.ndarray, height: int, width: int) -> np.ndarray:
        """Low-resolution mask logits [n, m, m] -> [n, H, W]: bilinear to the encoder's input size, crop the
        padding, bilinear to the frame (segment-anything's Sam.postprocess_masks, in OpenCV)."""
        s = self.img_size
        nh, nw = int(height * s / max(height, width) + 0.5), int(width * s / max(height, width) + 0.5)
        out = np.empty((len(low_res), height, width), np.float32)
        for i, lg in enumerate(low_res):
            up = cv2.resize(lg.astype(np.float32), (s, s), interpolation=cv2.INTER_LINEAR)[:nh, :nw]
            out[i] = cv2.resize(up, (width, height), interpolation=cv2.INTER_LINEAR)
        return out

    def segment(self, image: np.ndarray, boxes_xyxy: np.ndarray, class_ids: np.ndarray | Sequence[int]) -> list[np.ndarray]:
        boxes = np.asarray(boxes_xyxy, np.float32).reshape(-1, 4)
        if len(boxes) == 0:
            return []
        h, w = image.shape[:2]
        t0 = time.perf_counter()
        emb, scale = self.encode(image)
        t1 = time.perf_counter()
        logits = self.decode(emb, scale, boxes, h, w)
        t2 = time.perf_counter()
        self.last_timings = {"encoder_ms": (t1 - t0) * 1000, "decoder_ms": (t2 - t1) * 1000}
        return [lg > self.mask_threshold for lg in logits]


# ---- factory ----------------------------------------------------------------------------------------
def load_segmenter(settings: Settings, model_uri: str | None = None) -> Segmenter | None:
    """The segmenter chosen by settings.segmenter: None for 'none'; 'sam' reads settings.sam_model (a
    directory from `sqis sam export`); 'yolo-seg' loads settings.segment_model, else the detector's
    own model (model_uri) when that is a YOLOv8-seg ONNX."""
    kind = getattr(settings, "segmenter", "none")
    if kind == "none":
        return None
    if kind == "sam":
        sam_dir = getattr(settings, "sam_model", None)
        if not sam_dir:
            raise DetectorError("segmenter=sam needs SQIS_SAM_MODEL (a directory from `sqis sam export`)")
        seg: Segmenter = SamSegmenter.from_dir(sam_dir, settings.onnx_providers, settings.onnx_threads)
    elif kind == "yolo-seg":
        uri = getattr(settings, "segment_model", None) or model_uri
        if not uri:
            raise DetectorError("segmenter=yolo-seg needs SQIS_SEGMENT_MODEL or a yolo-seg detector model")
        path: Path | str = uri
        if str(uri).startswith(("models:/", "runs:/")):
            from inference_workers.model_loader import resolve_model

            path = resolve_model(settings, str(uri)).path
        path = Path(str(path).removeprefix("file://")).expanduser()
        if not path.is_file():
            raise DetectorError(f"segment model {path} does not exist")
        seg = YoloSegSegmenter(make_session(path, settings.onnx_providers, settings.onnx_threads), path=str(path))
    else:
        raise DetectorError(f"segmenter {kind!r}: expected one of {', '.join(SEGMENTERS)}")
    log.info("segmenter loaded", extra={"segmenter": seg.name})
    return seg


# ---- overlay ----------------------------------------------------------------------------------------
_PALETTE = ((0, 0, 255), (0, 200, 255), (255, 0, 255), (0, 255, 0), (255, 128, 0), (255, 255, 0))


def draw_inspection(image: np.ndarray, detections: Sequence[dict[str, Any]], alpha: float = 0.4) -> np.ndarray:
    """A copy of the BGR frame with each Inspection detection drawn: mask filled (from its RLE) and outlined
    (its polygon) when present, else the box; label `class score [length mm]`. For the object-store
    overlay and the dashboard gallery."""
    out = _as_bgr(image).copy()
    h, w = out.shape[:2]
    fill = out.copy()
    for d in detections:
        color = _PALETTE[int(d.get("class_id", 0)) % len(_PALETTE)]
        m = d.get("mask")
        if m and int(m["height"]) == h and int(m["width"]) == w:
            fill[rle_decode(m)] = color
        poly = d.get("polygon") or []
        if len(poly) >= 6:
            pts = np.round(np.asarray(poly, np.float32).reshape(-1, 1, 2)).astype(np.int32)
            cv2.polylines(out, [pts], True, color, 1, cv2.LINE_AA)
        else:
            cv2.rectangle(out, (int(d["x1"]), int(d["y1"])), (int(d["x2"]), int(d["y2"])), color, 1)
        label = f"{d.get('class_name', '')} {float(d.get('score', 0)):.2f}"
        if d.get("length_mm") is not None:
            label += f" {float(d['length_mm']):.1f}mm"
        cv2.putText(out, label, (int(d["x1"]), max(int(d["y1"]) - 3, 10)), cv2.FONT_HERSHEY_SIMPLEX, 0.4, color, 1,
                    cv2.LINE_AA)
    return cv2.addWeighted(fill, alpha, out, 1 - alpha, 0)
