"""The verdict on one frame and the Inspection record that carries it (schemas/avro/inspection.avsc)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from inference_workers.detections import Detection, Detections
from inference_workers.detector import Thresholds

PASS = "PASS"
FAIL = "FAIL"


def decide(detections: Detections | Sequence[Detection], thresholds: Thresholds) -> str:
    """FAIL when at least one detection reaches its class's score threshold, else PASS; with a calibrated
    image-level threshold, FAIL when the top detection score reaches it (class thresholds never exceed it).
    Decided on the columns (rows are converted first: one code path)."""
    dets = Detections.from_rows(detections)
    if not len(dets):
        return PASS
    conf = dets.confidence.astype(np.float64)
    if thresholds.image_score is not None:
        return FAIL if bool((conf >= thresholds.image_score).any()) else PASS
    thr = np.array([thresholds.score_for(dets.class_name(i)) for i in range(len(dets))], np.float64)
    return FAIL if bool((conf >= thr).any()) else PASS


@dataclass(frozen=True)
class Timings:
    """Milliseconds per stage for one frame (batch-level stages are the batch's wall time)."""

    queue_ms: float
    fetch_ms: float
    decode_ms: float
    infer_ms: float
    postprocess_ms: float
    total_ms: float
    segment_ms: float = 0.0

    def to_avro(self) -> dict[str, float]:
        return {k: round(float(v), 3) for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class ImageStats:
    """Cheap statistics of the decoded frame for drift monitoring (Inspection v2 ``image_stats``)."""

    brightness: float  # mean grey level
    contrast: float  # std of the grey level
    sharpness: float  # variance of the Laplacian
    max_score: float = 0.0  # highest raw model score before thresholds

    def to_avro(self) -> dict[str, float]:
        return {k: round(float(v), 4) for k, v in self.__dict__.items()}


def build_inspection(ref: Mapping[str, Any], *, detections: Detections | Sequence[Detection], thresholds: Thresholds,
                     model_name: str, model_version: str, timings: Timings, inspected_at_us: int, batch_size: int,
                     worker_id: str, source_partition: int, source_offset: int, width: int, height: int,
                     image_stats: ImageStats | None = None, verdict: str | None = None) -> dict[str, Any]:
    """An Inspection record for FrameRef ``ref``; width/height are the decoded image's. ``verdict``: the
    one already decided (inference.VerdictPolicy); None decides it here by the score thresholds."""
    rec = {
        "frame_id": ref["frame_id"],
        "line_id": ref["line_id"],
        "camera_id": ref["camera_id"],
        "seq": int(ref["seq"]),
        "part_id": ref.get("part_id"),
        "captured_at": int(ref["captured_at"]),
        "inspected_at": int(inspected_at_us),
        "image_uri": ref["uri"],
        "width": int(width),
        "height": int(height),
        "model_name": model_name,
        "model_version": model_version,
        "thresholds": thresholds.to_avro(),
        "verdict": verdict if verdict is not None else decide(detections, thresholds),
        "detections": [d.to_avro() for d in detections],
        "timings": timings.to_avro(),
        "batch_size": int(batch_size),
        "worker_id": worker_id,
        "source_partition": int(source_partition),
        "source_offset": int(source_offset),
    }
    if image_stats is not None:
        rec["image_stats"] = image_stats.to_avro()
    return rec
