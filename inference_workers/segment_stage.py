"""The worker's segmentation + sizing stage, applied to a built Inspection record (one call site).

- masks (when a segmenter is configured): each detection gets its COCO RLE mask and outline polygon;
  the per-frame label image (pixel = detection index + 1) goes to the object store -> mask_uri.
- physical size (when the camera's pixel size is known): area_mm2 (mask, else box) and length_mm
  (longest extent of the mask, else the box diagonal).
- verdict rules: `METRIC OP VALUE[:CLASS]` with METRIC score | area_mm2 | length_mm | area_px | length_px,
  e.g. `length_mm>2:scratch`. A detection (already at its class's score threshold) FAILs the frame when
  its class has no size rule, or when one of its class's size rules holds. Without a measurable size
  (no pixel size for a mm rule) it FAILs (fail-safe). The rules that fired go to verdict_rules.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.segment import (
    Segmenter,
    YoloSegSegmenter,
    encode_label_png,
    label_image,
    load_segmenter,
    mask_record,
)
from schemas.verdict_rules import SizeRule, parse_rules

if TYPE_CHECKING:
    from infra.objectstore import ObjectStore
    from infra.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["SegmentationStage", "SizeRule", "apply_rules", "parse_rules"]

def apply_rules(detections: Sequence[Mapping[str, Any]], rules: Sequence[SizeRule],
                score_threshold: Callable[[str], float]) -> tuple[str, list[str]]:
    """(verdict, fired rules) for a frame's detections (Inspection detection dicts with optional
    area_mm2 / length_mm and the extra keys area_px / length_px)."""
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
    return ("FAIL" if fired else "PASS"), fired


def _box_sizes(d: Mapping[str, Any]) -> tuple[float, float]:
    w, h = max(float(d["x2"]) - float(d["x1"]), 0.0), max(float(d["y2"]) - float(d["y1"]), 0.0)
    return w * h, math.hypot(w, h)


class SegmentationStage:
    """Masks, physical size and rule-based verdict for Inspection records."""

    def __init__(self, segmenter: Segmenter | None, *, store: ObjectStore | None = None,
                 pixel_mm: Mapping[str, float] | None = None, default_pixel_mm: float | None = None,
                 rules: Sequence[SizeRule] = (), store_masks: bool = True) -> None:
        self.segmenter = segmenter
        self.store = store
        self.pixel_mm = dict(pixel_mm or {})
        self.default_pixel_mm = default_pixel_mm
        self.rules = list(rules)
        self.store_masks = store_masks

    @classmethod
    def from_settings(cls, settings: Settings, model_uri: str | None = None,
                      store: ObjectStore | None = None) -> SegmentationStage | None:
        """None when nothing is configured (no segmenter, pixel size or rule): the worker skips the stage."""
        seg = load_segmenter(settings, model_uri)
        pixel_mm = dict(getattr(settings, "camera_pixel_mm", {}) or {})
        default = getattr(settings, "pixel_mm", None)
        rules = parse_rules(getattr(settings, "verdict_rules", None))
        if seg is None and not pixel_mm and default is None and not rules:
            return None
        return cls(seg, store=store, pixel_mm=pixel_mm, default_pixel_mm=default, rules=rules)

    def mm_per_px(self, camera_id: str) -> float | None:
        return self.pixel_mm.get(camera_id, self.default_pixel_mm)

    def apply(self, rec: dict[str, Any], image: np.ndarray | None, thresholds: Any) -> dict[str, Any]:
        """Fill masks / sizes / verdict of `rec` (an Inspection dict) in place and return it."""
        t0 = time.perf_counter()
        dets: list[dict[str, Any]] = rec["detections"]
        extra: list[dict[str, Any]] = [{} for _ in dets]
        if self.segmenter is not None and image is not None:
            rec["segmenter"] = self.segmenter.name
            if dets:
                boxes = np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float32)
                cls = np.array([d["class_id"] for d in dets])
                if isinstance(self.segmenter, YoloSegSegmenter):  # scores pick the exact anchors
                    masks = self.segmenter.segment(image, boxes, cls, np.array([d["score"] for d in dets]))
                else:
                    masks = self.segmenter.segment(image, boxes, cls)
                for d, e, m in zip(dets, extra, masks, strict=True):
                    info = mask_record(m)
                    d["mask"] = info.rle
                    d["polygon"] = info.polygon
                    e["area_px"], e["length_px"] = float(info.area_px), info.length_px
                if self.store is not None and self.store_masks:
                    key = f"masks/{rec['line_id']}/{rec['camera_id']}/{rec['frame_id']}.png"
                    rec["mask_uri"] = self.store.put(key, encode_label_png(label_image(masks, *image.shape[:2])),
                                                     "image/png")
        mm = self.mm_per_px(str(rec["camera_id"]))
        for d, e in zip(dets, extra, strict=True):
            if "area_px" not in e:
                e["area_px"], e["length_px"] = _box_sizes(d)
            if mm is not None:
                d["area_mm2"] = float(e["area_px"] * mm * mm)
                d["length_mm"] = float(e["length_px"] * mm)
        scored = [{**d, **e} for d, e in zip(dets, extra, strict=True)]
        verdict, fired = apply_rules(scored, self.rules, thresholds.score_for)
        rec["verdict"], rec["verdict_rules"] = verdict, fired
        ms = (time.perf_counter() - t0) * 1000
        timings = rec.get("timings")
        if isinstance(timings, dict):
            timings["segment_ms"] = round(float(timings.get("segment_ms", 0.0)) + ms, 3)
            timings["total_ms"] = round(float(timings.get("total_ms", 0.0)) + ms, 3)
        return rec
