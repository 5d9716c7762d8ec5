"""Active-learning marks of one inspected frame (issue #21 section 2): which frames deserve a person's look.

- ``uncertain``: the frame's strongest evidence lies within an absolute score band around its operating
  threshold: ``|m| <= band`` where ``m = max(score - threshold(class))`` over its detections and its
  sub-threshold candidates (with a calibrated image-level threshold, ``threshold`` is that one). ``m >= 0``
  is exactly the score verdict's FAIL, so the band is the decision boundary's neighbourhood, in the units
  the thresholds are set in. Absolute rather than relative (thr*(1±b)): a relative band shrinks to nothing
  at low thresholds (0.05 ± 0.01), where a model is least sure, and widens past usefulness at high ones.
- ``seg_disagree``: a detection at its threshold whose mask covers less than ``min_mask_frac`` of its box
  (the segmenter found (almost) nothing where the detector fired).

The marks travel as Kafka headers on the Inspection (infra/review_queue.py encode_headers), never in the
Avro record. An uncertain PASS frame has no boxes in its record (the detector keeps only detections at
their thresholds), so the header carries its top-k sub-threshold candidates: the reviewer sees them and a
confirmed miss is exported with them as labels (training/reviewed.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_workers.detections import Detections
from inference_workers.detector import Thresholds
from infra.review_queue import encode_headers

__all__ = ["Marks", "ReviewPolicy"]


@dataclass(frozen=True)
class Marks:
    """Why a frame should be reviewed (empty: it should not) and what the reviewer needs."""

    reasons: tuple[str, ...] = ()
    score: float | None = None  # the top score relative to which the margin is taken
    margin: float | None = None  # score - its threshold (< 0: below, the frame passed on score)
    candidates: tuple[dict[str, Any], ...] = ()

    def headers(self) -> list[tuple[str, bytes]]:
        return encode_headers(self.reasons, self.score, self.margin, self.candidates)


def _box(dets: Detections, i: int) -> dict[str, Any]:
    x1, y1, x2, y2 = (round(float(v), 1) for v in dets.xyxy[i])
    return {"class_id": int(dets.class_id[i]), "class_name": dets.class_name(i),
            "score": round(float(dets.confidence[i]), 4), "x1": x1, "y1": y1, "x2": x2, "y2": y2}


@dataclass(frozen=True)
class ReviewPolicy:
    """The marking settings (SQIS_REVIEW_BAND, SQIS_REVIEW_CANDIDATES, SQIS_REVIEW_MIN_MASK_FRAC)."""

    band: float = 0.1
    top_k: int = 5
    min_mask_frac: float = 0.05

    @classmethod
    def from_settings(cls, settings: Any) -> ReviewPolicy:
        return cls(settings.review_band, settings.review_candidates, settings.review_min_mask_frac)

    @property
    def active(self) -> bool:
        return self.band > 0 or self.min_mask_frac > 0

    def _thr(self, thresholds: Thresholds, name: str) -> float:
        return float(thresholds.image_score) if thresholds.image_score is not None else thresholds.score_for(name)

    def mark(self, dets: Detections, thresholds: Thresholds, candidates: Detections | None = None) -> Marks:
        """The marks of a frame from its final detections and its sub-threshold candidates (or None)."""
        reasons: list[str] = []
        best: tuple[float, float] | None = None  # (margin, score)
        pool = [(dets, i) for i in range(len(dets))]
        if candidates is not None:
            pool += [(candidates, i) for i in range(len(candidates))]
        for d, i in pool:
            s = float(d.confidence[i])
            m = s - self._thr(thresholds, d.class_name(i))
            if best is None or m > best[0]:
                best = (m, s)
        if self.band > 0 and best is not None and abs(best[0]) <= self.band:
            reasons.append("uncertain")
        if self.min_mask_frac > 0 and "area_px" in dets.data and len(dets):
            wh = np.clip(dets.xyxy[:, 2:] - dets.xyxy[:, :2], 0, None)
            box = wh.prod(1)
            frac = np.where(box > 0, dets.data["area_px"].astype(np.float64) / np.where(box > 0, box, 1), 1.0)
            at = np.array([float(dets.confidence[i]) >= self._thr(thresholds, dets.class_name(i))
                           for i in range(len(dets))], bool)
            if bool(((frac < self.min_mask_frac) & at).any()):
                reasons.append("seg_disagree")
        if not reasons:
            return Marks()
        cands: tuple[dict[str, Any], ...] = ()
        if candidates is not None and len(candidates) and self.top_k:
            order = np.argsort(-candidates.confidence, kind="stable")[: self.top_k]
            cands = tuple(_box(candidates, int(i)) for i in order)
        margin, score = best if best is not None else (None, None)
        return Marks(tuple(reasons), None if score is None else round(score, 4),
                     None if margin is None else round(margin, 4), cands)
