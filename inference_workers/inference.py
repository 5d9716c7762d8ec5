"""The inference path, top to bottom: detect (masks included) -> decide the verdict once -> build the record.

    decoded frames --FrameDetector.run()--> one Detections per frame (mask column when segmenting)
                   --VerdictPolicy.decide()--> Decision (verdict, rules that fired, sizes in mm)
                   --inspection_record()--> the Inspection dict (schemas/avro/inspection.avsc)

A :class:`FrameDetector` is what a worker serves; three implementations:

- :class:`OnnxDetector`: a plain YOLOv8 ONNX :class:`~inference_workers.detector.Detector` (its stages:
  letterbox made in the fetch pool, one batched run, decode), or anything with ``detect(images)``
  (:class:`~inference_workers.tiling.TiledDetector`, test fakes).
- :class:`SegmentingDetector`: the same plus a mask per detection. A YOLOv8-seg model decodes boxes and
  masks from ONE forward pass (the prototypes come out of the same run); SAM encodes each image once and
  decodes all of its boxes in one batched call.

:func:`served_model` builds the served form of the detector a :class:`~inference_workers.model_loader.ModelWatcher`
holds, so the segmenter follows every hot swap of the detector (one object per model version).
:func:`inspect_one` is the whole path for one image outside the worker (the HTTP ``/v1/inspect``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from inference_workers.detections import Detection, Detections
from inference_workers.detector import ARCH_RTDETR, PAD_VALUE, DetectorError, Thresholds
from inference_workers.errors import InferenceError
from inference_workers.verdict import FAIL, PASS, ImageStats, Timings, build_inspection, decide
from schemas.verdict_rules import SizeRule, parse_rules

if TYPE_CHECKING:
    from inference_workers.segment import Segmenter
    from infra.objectstore import ObjectStore
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = [
    "BatchOutput", "Decision", "FrameDetector", "OnnxDetector", "SegmentingDetector", "VerdictPolicy",
    "as_detections", "inspect_one", "inspection_record", "load_served", "served_model",
]


class RecordError(InferenceError):
    """A frame was inferred but its masks or record could not be made (dead-lettered as inspection_error)."""


# ---- the detector protocol ---------------------------------------------------------------------------
@dataclass
class BatchOutput:
    """One batch through a FrameDetector: per frame its Detections or the exception it raised."""

    results: list[Detections | Exception]
    max_scores: list[float | None]
    infer_ms: float = 0.0
    post_ms: float = 0.0
    segment_ms: list[float] = field(default_factory=list)  # per frame: mask decoding and measuring
    labels: list[np.ndarray | None] = field(default_factory=list)  # per frame: label image when segmenting
    prepared_used: bool = False  # the model input came from the fetch pool
    all_failed: bool = False
    model_ok: bool = True  # when all failed: does the model still run on a probe image?


@runtime_checkable
class FrameDetector(Protocol):
    """What a worker serves: one :class:`Detections` per frame, with a mask column when segmenting."""

    name: str
    version: str
    thresholds: Thresholds
    segmenter_name: str | None  # None: no masks
    prepare: Callable[[np.ndarray], Any] | None  # per-frame model input made in the fetch pool, or None

    def run(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()) -> BatchOutput:
        """The batch; never raises for a frame's fault (see BatchOutput.results / all_failed)."""
        ...

    def detect_batch(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()) -> tuple[BatchOutput, Any]:
        """run()'s first half: the forward pass and the boxes; the second value is for finish()."""
        ...

    def finish(self, images: Sequence[np.ndarray], out: BatchOutput, forward: Any) -> BatchOutput:
        """run()'s second half: the masks (from the same forward pass); the worker runs it on a thread of
        its own, overlapped with the next batch's forward pass."""
        ...


@runtime_checkable
class _Staged(Protocol):
    """A detector with separately callable stages (detector.Detector)."""

    def batch_prepared(self, prepared: Sequence[Any]) -> Any: ...
    def preprocess(self, images: Sequence[np.ndarray]) -> Any: ...
    def infer_all(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]: ...
    def boxes_of(self, raw: np.ndarray) -> np.ndarray: ...
    def postprocess(self, raw: np.ndarray, metas: Sequence[Any]) -> list[Detections]: ...
    def max_raw_scores(self, raw: np.ndarray) -> np.ndarray: ...
    def prepare_one(self, image: np.ndarray) -> Any: ...


def as_detections(x: Detections | Sequence[Detection], class_names: Sequence[str] = ()) -> Detections:
    """One columnar type inside the path: rows (a duck-typed detector's output) become Detections."""
    return Detections.from_rows(x, class_names)


@dataclass
class _Forward:
    """What one batched forward pass left for the segmenter: letterbox metas, head output, prototypes."""

    metas: Sequence[Any]
    raw: np.ndarray
    protos: np.ndarray | None


class OnnxDetector:
    """A plain detector as a FrameDetector: staged (prepared input, one run, decode) or via ``detect()``."""

    segmenter_name: str | None = None

    def __init__(self, det: Any, thresholds: Thresholds | None = None) -> None:
        self.det = det
        self.name, self.version = str(det.name), str(det.version)
        self.thresholds: Thresholds = getattr(det, "thresholds", None) or thresholds or Thresholds()
        self.class_names: Sequence[str] = tuple(getattr(det, "class_names", ()) or ())
        self.staged = isinstance(det, _Staged)
        self.prepare: Callable[[np.ndarray], Any] | None = det.prepare_one if self.staged else None
        self.imgsz: tuple[int, int] = tuple(getattr(det, "imgsz", (64, 64)))  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.det!r})"

    def run(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()) -> BatchOutput:
        return self.finish(images, *self.detect_batch(images, prepared))

    def detect_batch(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()
                     ) -> tuple[BatchOutput, _Forward | None]:
        t0 = time.perf_counter()
        try:
            return self._detect(images, prepared, t0)
        except Exception as exc:
            return self._one_by_one(images, exc), None

    def finish(self, images: Sequence[np.ndarray], out: BatchOutput, forward: Any) -> BatchOutput:
        if out.all_failed:
            return out
        return self._segment(images, out, forward)

    def _detect(self, images: Sequence[np.ndarray], prepared: Sequence[Any], t0: float
                ) -> tuple[BatchOutput, _Forward | None]:
        n = len(images)
        if not self.staged:
            results: list[Detections | Exception] = [as_detections(x, self.class_names) for x in self.det.detect(images)]
            t1 = time.perf_counter()
            return BatchOutput(results, [None] * n, (t1 - t0) * 1000), None
        det = self.det
        ready = det.batch_prepared(prepared) if prepared else None
        arr, metas = ready if ready is not None else det.preprocess(images)
        raw, protos = det.infer_all(arr)
        t1 = time.perf_counter()
        boxes = det.boxes_of(raw)
        results = list(det.postprocess(boxes, metas))
        scores: list[float | None] = [float(x) for x in det.max_raw_scores(boxes)]
        out = BatchOutput(results, scores, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000,
                          prepared_used=ready is not None)
        return out, _Forward(metas, raw, protos)

    def _segment(self, images: Sequence[np.ndarray], out: BatchOutput, fwd: _Forward | None) -> BatchOutput:
        return out  # no masks

    def candidates(self, forward: Any, i: int, band: float, top_k: int) -> Detections | None:
        """Frame ``i``'s boxes scoring within ``band`` below their class's threshold (top ``top_k``, after
        NMS), decoded again from the batch's head output: what an uncertain PASS frame's reviewer needs
        (the record keeps only detections at their thresholds). None for a detector without stages."""
        if not isinstance(forward, _Forward) or not self.staged or top_k <= 0 or band <= 0:
            return None
        if not self.class_names:
            return None
        thr = np.array([self.thresholds.score_for(n) for n in self.class_names], np.float32)
        raw = self.det.boxes_of(forward.raw[i:i + 1])[0]
        low = np.clip(thr - band, 1e-3, 1.0).astype(np.float32)
        near = float(self.det.max_raw_scores(raw[None])[0]) if raw.size else 0.0
        if near < float(low.min()):
            return None  # nothing near any threshold: skip the decode
        if self.det.arch == ARCH_RTDETR:  # NMS-free [K, 6] rows
            cands = Detections.from_rtdetr_output(raw, low, self.det.imgsz, class_names=self.class_names,
                                                  letterbox=forward.metas[i], max_det=max(top_k * 4, 20))
        else:
            cands = Detections.from_onnx_output(raw, low, self.thresholds.iou, class_names=self.class_names,
                                                letterbox=forward.metas[i], max_det=max(top_k * 4, 20))
        if len(cands):
            cands = cands[cands.confidence < thr[cands.class_id.astype(np.intp)]]  # what the record does not carry
        if len(cands) > top_k:
            cands = cands[np.argsort(-cands.confidence, kind="stable")[:top_k]]
        return cands

    def _one_by_one(self, images: Sequence[np.ndarray], exc: Exception) -> BatchOutput:
        """The batch failed: isolate the frame(s) the model cannot run on; the others are still inspected."""
        log.warning("batch inference failed; retrying frame by frame", extra={
            "model_name": self.name, "error": f"{type(exc).__name__}: {exc}", "batch_size": len(images)})
        t0 = time.perf_counter()
        results: list[Detections | Exception] = []
        for img in images:
            try:
                results.append(self.detect_one(img) if len(images) > 1 else exc)
            except Exception as one_exc:
                results.append(one_exc)
        t1 = time.perf_counter()
        if all(isinstance(x, Exception) for x in results):
            return BatchOutput(results, [None] * len(images), all_failed=True, model_ok=self.probe())
        return BatchOutput(results, [None] * len(images), (t1 - t0) * 1000)

    def detect_one(self, image: np.ndarray) -> Detections:
        return as_detections(self.det.detect([image])[0], self.class_names)

    def probe(self) -> bool:
        """Does the model still run on a plain grey image? (False: the model or runtime is broken.)"""
        h, w = self.imgsz
        try:
            self.det.detect([np.full((h, w, 3), PAD_VALUE, np.uint8)])
            return True
        except Exception:
            return False


class SegmentingDetector(OnnxDetector):
    """Detections with a mask each. ``segmenter`` None: the detector's own YOLOv8-seg head (boxes and
    masks from one forward pass); else a separate segmenter (SAM: one encoding per image, one batched
    decoder call for all of its boxes; or another yolo-seg model)."""

    def __init__(self, det: Any, segmenter: Segmenter | None = None, thresholds: Thresholds | None = None) -> None:
        super().__init__(det, thresholds)
        self.own_head = segmenter is None
        if segmenter is None:
            from inference_workers.segment import YoloSegSegmenter

            if not self.staged:
                raise DetectorError(f"{det!r}: a tiled or duck-typed detector needs a separate segmenter")
            # the detector's own session: no second copy of the model, no second forward pass
            segmenter = YoloSegSegmenter(det.session, path=getattr(det, "path", None))
            segmenter.name = f"yolo-seg:{self.name}@{self.version}"
        self.segmenter = segmenter
        self.segmenter_name = segmenter.name

    def _segment(self, images: Sequence[np.ndarray], out: BatchOutput, fwd: _Forward | None) -> BatchOutput:
        from inference_workers.segment import YoloSegSegmenter

        seg = self.segmenter
        out.labels, out.segment_ms = [None] * len(images), [0.0] * len(images)
        for i, (img, dets) in enumerate(zip(images, out.results, strict=True)):
            if isinstance(dets, Exception):
                continue
            t0 = time.perf_counter()
            try:
                if not len(dets):
                    masks: list[np.ndarray] = []
                elif self.own_head and fwd is not None and fwd.protos is not None:
                    assert isinstance(seg, YoloSegSegmenter)
                    masks = seg.masks_for(fwd.raw[i], fwd.protos[i], fwd.metas[i], dets.xyxy, dets.class_id,
                                          dets.confidence)
                elif isinstance(seg, YoloSegSegmenter):  # frame by frame after a failed batch, or another model
                    masks = seg.segment(img, dets.xyxy, dets.class_id, dets.confidence if self.own_head else None)
                else:
                    masks = seg.segment(img, dets.xyxy, dets.class_id)
                out.results[i], out.labels[i] = with_masks(dets, masks, *img.shape[:2])
            except Exception as exc:
                out.results[i] = RecordError(f"segmentation failed: {type(exc).__name__}: {exc}")
            out.segment_ms[i] = (time.perf_counter() - t0) * 1000
        return out


def with_masks(dets: Detections, masks: Sequence[np.ndarray], height: int, width: int
               ) -> tuple[Detections, np.ndarray]:
    """The detections with their mask column (COCO RLE) and measured columns (area_px, length_px,
    polygon), and the frame's label image (pixel = detection index + 1)."""
    from inference_workers.segment import label_image, mask_record

    infos = [mask_record(m) for m in masks]
    polygons = np.empty(len(infos), object)
    polygons[:] = [i.polygon for i in infos]
    data = dict(dets.data) | {"area_px": np.array([i.area_px for i in infos], np.float64),
                              "length_px": np.array([i.length_px for i in infos], np.float64),
                              "polygon": polygons}
    out = Detections(dets.xyxy, dets.confidence, dets.class_id, dets.class_names, [i.rle for i in infos], data)
    return out, label_image(masks, height, width)


def served_model(det: Any, *, segmenter: str = "none", shared: Segmenter | None = None,
                 thresholds: Thresholds | None = None) -> FrameDetector:
    """The served form of a loaded detector: ``segmenter`` 'none' -> OnnxDetector; 'yolo-seg' without a
    ``shared`` segmenter -> the detector's own seg head; otherwise the shared segmenter (SAM, or a
    separate yolo-seg model). Called for every model version the watcher swaps in, so detector and
    segmenter always move together."""
    if segmenter == "none":
        return OnnxDetector(det, thresholds)
    return SegmentingDetector(det, shared, thresholds)


def shared_segmenter(settings: Settings, model_uri: str | None = None, *, tiled: bool = False) -> Segmenter | None:
    """The segmenter loaded once for every detector version (SAM; a yolo-seg model other than the
    detector's, SQIS_SEGMENT_MODEL); None when masks come from the detector's own head."""
    from inference_workers.segment import load_segmenter

    kind = settings.segmenter
    if kind == "none" or (kind == "yolo-seg" and not settings.segment_model and not tiled):
        return None
    return load_segmenter(settings, model_uri)


def load_served(settings: Settings, model_uri: str, thresholds: Thresholds | None = None) -> FrameDetector:
    """The FrameDetector a worker would serve for ``model_uri`` with these settings (segmenter included),
    for callers outside the worker (``inspect_one``, the HTTP API)."""
    from inference_workers.model_loader import load_detector

    det = load_detector(settings, model_uri, thresholds)
    return served_model(det, segmenter=settings.segmenter, shared=shared_segmenter(settings, model_uri),
                        thresholds=thresholds)


class ModelSwitch:
    """The served model for the watcher's current detector, built once per version (identity cache):
    the infer stage reads the detector once per batch, so detector and segmenter swap together between
    batches. Safe across threads: the cache is one (detector, served) tuple, replaced whole."""

    def __init__(self, build: Callable[[Any], FrameDetector]) -> None:
        self.build = build  # also the model watcher's check of a new version (not cached: not served yet)
        self._cache: tuple[Any, FrameDetector] | None = None

    def served(self, det: Any) -> FrameDetector:
        cache = self._cache
        if cache is not None and cache[0] is det:
            return cache[1]
        served = self.build(det)
        self._cache = (det, served)
        return served


# ---- the verdict -------------------------------------------------------------------------------------
def apply_rules(detections: Sequence[Mapping[str, Any]], rules: Sequence[SizeRule],
                score_threshold: Callable[[str], float]) -> tuple[str, list[str]]:
    """(verdict, fired rules) for a frame's detections (mappings with class_name, score and optional
    area_mm2 / length_mm / area_px / length_px). A detection at its class's score threshold FAILs the
    frame when its class has no size rule, or when one of its size rules holds; unmeasurable -> FAIL."""
    fired: list[str] = []
    for d in detections:
        name = str(d["class_name"])
        thr = score_threshold(name)
        if float(d["score"]) < thr:
            continue
        own = [r for r in rules if r.applies_to(name)]
        size_rules = [r for r in own if r.metric != "score"]
        score_rules = [r for r in own if r.metric == "score"]
        if score_rules and not all(r.holds(d) for r in score_rules):
            continue
        if not size_rules:
            fired.append(f"score>={thr:g}:{name}")
            continue
        for r in size_rules:
            ok = r.holds(d)
            if ok is None:
                fired.append(f"{r}(unmeasured)")
            elif ok:
                fired.append(str(r))
    fired = list(dict.fromkeys(fired))
    return (FAIL if fired else PASS), fired


@dataclass(frozen=True)
class Decision:
    """The verdict on one frame and what it was decided from."""

    verdict: str
    rules: list[str] | None = None  # the rules that fired (None: plain score thresholds, not recorded)
    area_mm2: np.ndarray | None = None
    length_mm: np.ndarray | None = None


@dataclass(frozen=True)
class VerdictPolicy:
    """How a frame's final Detections become its verdict: score thresholds, or with sizing/rules/masks
    configured, size rules over mask (else box) sizes in mm (``METRIC OP VALUE[:CLASS]``)."""

    rules: tuple[SizeRule, ...] = ()
    pixel_mm: Mapping[str, float] = field(default_factory=dict)
    default_pixel_mm: float | None = None
    sized: bool = False  # rules, pixel sizes or masks configured: the rule path (verdict_rules recorded)

    @classmethod
    def from_settings(cls, settings: Settings) -> VerdictPolicy:
        rules = tuple(parse_rules(settings.verdict_rules))
        pixel_mm = dict(settings.camera_pixel_mm or {})
        sized = bool(rules or pixel_mm or settings.pixel_mm is not None or settings.segmenter != "none")
        return cls(rules, pixel_mm, settings.pixel_mm, sized)

    def mm_per_px(self, camera_id: str) -> float | None:
        return self.pixel_mm.get(camera_id, self.default_pixel_mm)

    def decide(self, dets: Detections, thresholds: Thresholds, camera_id: str) -> Decision:
        """The verdict, once, from the final detections (scores, classes, sizes in mm)."""
        if not self.sized:
            return Decision(decide(dets, thresholds))
        if "area_px" in dets.data:
            area_px, length_px = dets.data["area_px"].astype(np.float64), dets.data["length_px"].astype(np.float64)
        else:  # no mask: the box
            wh = np.clip(dets.xyxy[:, 2:] - dets.xyxy[:, :2], 0, None)
            area_px, length_px = wh.prod(1), np.hypot(wh[:, 0], wh[:, 1])
        mm = self.mm_per_px(camera_id)
        area_mm2 = area_px * mm * mm if mm is not None else None
        length_mm = length_px * mm if mm is not None else None
        rows = [{"class_name": dets.class_name(i), "score": float(dets.confidence[i]), "area_px": float(area_px[i]),
                 "length_px": float(length_px[i]),
                 "area_mm2": None if area_mm2 is None else float(area_mm2[i]),
                 "length_mm": None if length_mm is None else float(length_mm[i])} for i in range(len(dets))]
        verdict, fired = apply_rules(rows, self.rules, thresholds.score_for)
        return Decision(verdict, fired, area_mm2, length_mm)


# ---- the record --------------------------------------------------------------------------------------
def mask_key(ref: Mapping[str, Any]) -> str:
    return f"masks/{ref['line_id']}/{ref['camera_id']}/{ref['frame_id']}.png"


def inspection_record(ref: Mapping[str, Any], dets: Detections, decision: Decision, model: FrameDetector, *,
                      timings: Timings, inspected_at_us: int, batch_size: int, worker_id: str,
                      source_partition: int, source_offset: int, width: int, height: int,
                      image_stats: ImageStats | None = None, mask_uri: str | None = None) -> dict[str, Any]:
    """The Inspection record of one frame from its final detections and the decision made on them."""
    rec = build_inspection(
        ref, detections=dets, thresholds=model.thresholds, model_name=model.name, model_version=model.version,
        timings=timings, inspected_at_us=inspected_at_us, batch_size=batch_size, worker_id=worker_id,
        source_partition=source_partition, source_offset=source_offset, width=width, height=height,
        image_stats=image_stats, verdict=decision.verdict)
    polygons = dets.data.get("polygon")
    for i, d in enumerate(rec["detections"]):
        if polygons is not None:
            d["polygon"] = [float(v) for v in polygons[i]]
        if decision.area_mm2 is not None and decision.length_mm is not None:
            d["area_mm2"], d["length_mm"] = float(decision.area_mm2[i]), float(decision.length_mm[i])
    if decision.rules is not None:
        rec["verdict_rules"] = decision.rules
    if model.segmenter_name is not None:
        rec["segmenter"] = model.segmenter_name
        if mask_uri is not None:
            rec["mask_uri"] = mask_uri
    return rec


def store_label(store: ObjectStore | None, ref: Mapping[str, Any], dets: Detections,
                label: np.ndarray | None) -> str | None:
    """Upload the frame's label image (one PNG per frame with detections); its URI, or None."""
    if store is None or label is None or not len(dets):
        return None
    from inference_workers.segment import encode_label_png

    return store.put(mask_key(ref), encode_label_png(label), "image/png")


def inspect_one(image: bytes | np.ndarray, ref: Mapping[str, Any], model: FrameDetector, *,
                policy: VerdictPolicy | None = None, store: ObjectStore | None = None, worker_id: str = "inspect",
                source_partition: int = -1, source_offset: int = -1, max_pixels: int | None = None,
                encodings: Sequence[str] | None = None) -> dict[str, Any]:
    """One image (encoded bytes or an HxWx3 BGR array) -> Detections -> verdict -> Inspection record.

    ``ref`` is a FrameRef-like mapping (frame_id, line_id, camera_id, seq, captured_at, uri; part_id
    optional); ``model`` a FrameDetector (``load_served(settings, model_uri)``), ``policy``
    ``VerdictPolicy.from_settings(settings)`` (default: score thresholds only).
    Bytes are decoded as the worker's fetch stage decodes a frame (``fetch.decode_image``: header probed
    against the pixel budget ``max_pixels`` and the formats ``encodings``, EXIF orientation, 16-bit and
    grey converted) and the record carries the same image statistics.
    Raises InferenceError instead of dead-lettering: a ``fetch.FrameError`` for an image the worker
    would refuse (corrupt, too large, a format not allowed), another one when the model fails."""
    from inference_workers.fetch import DEFAULT_ENCODINGS, DEFAULT_MAX_PIXELS, decode_image, image_stats

    t0 = time.perf_counter()
    if isinstance(image, bytes | bytearray | memoryview):
        img = decode_image(bytes(image), max_pixels=DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                           encodings=DEFAULT_ENCODINGS if encodings is None else tuple(encodings))
    else:
        img = np.asarray(image)
    stats = image_stats(img)
    decode_ms = (time.perf_counter() - t0) * 1000
    out = model.run([img])
    res = out.results[0]
    if isinstance(res, Exception):
        raise res if isinstance(res, InferenceError) else InferenceError(f"{type(res).__name__}: {res}")
    policy = policy or VerdictPolicy()
    decision = policy.decide(res, model.thresholds, str(ref["camera_id"]))
    label = out.labels[0] if out.labels else None
    seg_ms = out.segment_ms[0] if out.segment_ms else 0.0
    uri = store_label(store, ref, res, label)
    now = time.time_ns() // 1000
    timings = Timings(queue_ms=0.0, fetch_ms=0.0, decode_ms=decode_ms, infer_ms=out.infer_ms,
                      postprocess_ms=out.post_ms, total_ms=(time.perf_counter() - t0) * 1000, segment_ms=seg_ms)
    top = out.max_scores[0] if out.max_scores else None
    return inspection_record(ref, res, decision, model, timings=timings, inspected_at_us=now, batch_size=1,
                             worker_id=worker_id, source_partition=source_partition, source_offset=source_offset,
                             width=img.shape[1], height=img.shape[0], mask_uri=uri,
                             image_stats=ImageStats(*stats, max_score=top if top is not None else res.max_confidence))
