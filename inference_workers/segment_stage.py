"""Masks, sizes and the rule-based verdict for an Inspection record built elsewhere (a replay, a tool).

The worker does not use this: its path (inference_workers/inference.py) segments inside the detector
and decides the verdict once from the final Detections. This adapter runs the same pieces on a
record's detection dicts: a segmenter's masks (``with_masks``), the label image to the object store,
``VerdictPolicy.decide`` (rules ``METRIC OP VALUE[:CLASS]``, e.g. ``length_mm>2:scratch``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.detections import Detections
from inference_workers.inference import VerdictPolicy, apply_rules, store_label, with_masks
from inference_workers.segment import Segmenter, YoloSegSegmenter, load_segmenter
from schemas.verdict_rules import SizeRule, parse_rules

if TYPE_CHECKING:
    from infra.objectstore import ObjectStore
    from infra.settings import Settings

__all__ = ["SegmentationStage", "SizeRule", "apply_rules", "parse_rules"]


def _detections(dets: Sequence[Mapping[str, Any]]) -> Detections:
    names: list[str] = []
    for d in dets:
        while len(names) <= int(d["class_id"]):
            names.append(f"class{len(names)}")
        names[int(d["class_id"])] = str(d["class_name"])
    return Detections(np.array([[d["x1"], d["y1"], d["x2"], d["y2"]] for d in dets], np.float64).reshape(-1, 4),
                      [float(d["score"]) for d in dets], [int(d["class_id"]) for d in dets], names)


class SegmentationStage:
    """Masks, physical size and rule-based verdict for Inspection records (see the module docstring)."""

    def __init__(self, segmenter: Segmenter | None, *, store: ObjectStore | None = None,
                 pixel_mm: Mapping[str, float] | None = None, default_pixel_mm: float | None = None,
                 rules: Sequence[SizeRule] = (), store_masks: bool = True) -> None:
        self.segmenter = segmenter
        self.store = store if store_masks else None
        self.policy = VerdictPolicy(tuple(rules), dict(pixel_mm or {}), default_pixel_mm, sized=True)

    @classmethod
    def from_settings(cls, settings: Settings, model_uri: str | None = None,
                      store: ObjectStore | None = None) -> SegmentationStage | None:
        """None when nothing is configured (no segmenter, pixel size or rule)."""
        policy = VerdictPolicy.from_settings(settings)
        if not policy.sized:
            return None
        return cls(load_segmenter(settings, model_uri), store=store, pixel_mm=policy.pixel_mm,
                   default_pixel_mm=policy.default_pixel_mm, rules=policy.rules)

    def apply(self, rec: dict[str, Any], image: np.ndarray | None, thresholds: Any) -> dict[str, Any]:
        """Fill masks / sizes / verdict of ``rec`` (an Inspection dict) in place and return it."""
        t0 = time.perf_counter()
        rows: list[dict[str, Any]] = rec["detections"]
        dets = _detections(rows)
        if self.segmenter is not None and image is not None:
            rec["segmenter"] = self.segmenter.name
            if len(dets):
                if isinstance(self.segmenter, YoloSegSegmenter):  # scores pick the exact anchors
                    masks = self.segmenter.segment(image, dets.xyxy, dets.class_id, dets.confidence)
                else:
                    masks = self.segmenter.segment(image, dets.xyxy, dets.class_id)
                dets, label = with_masks(dets, masks, *image.shape[:2])
                uri = store_label(self.store, rec, dets, label)
                if uri is not None:
                    rec["mask_uri"] = uri
                for d, rle, poly in zip(rows, dets.masks or [], dets.data["polygon"], strict=True):
                    d["mask"], d["polygon"] = rle, list(poly)
        decision = self.policy.decide(dets, thresholds, str(rec["camera_id"]))
        if decision.area_mm2 is not None and decision.length_mm is not None:
            for d, a, n in zip(rows, decision.area_mm2, decision.length_mm, strict=True):
                d["area_mm2"], d["length_mm"] = float(a), float(n)
        rec["verdict"], rec["verdict_rules"] = decision.verdict, decision.rules
        ms = (time.perf_counter() - t0) * 1000
        timings = rec.get("timings")
        if isinstance(timings, dict):
            timings["segment_ms"] = round(float(timings.get("segment_ms", 0.0)) + ms, 3)
            timings["total_ms"] = round(float(timings.get("total_ms", 0.0)) + ms, 3)
        return rec
