"""The one place the API touches the model: an image in, an Inspection record out.

Built from the worker's public pieces (``decode_image`` with the pixel budget, ``Detector``,
``build_inspection`` whose ``decide`` makes the verdict, the optional ``SegmentationStage``), so
POST /v1/inspect judges a frame exactly as the line does. The worker's own one-image entry point
replaces the body of :func:`inspect_image` once it exists; callers do not change.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from inference_workers.fetch import decode_image, image_stats
from inference_workers.verdict import ImageStats, Timings, build_inspection
from infra.settings import Settings

API_WORKER_PREFIX = "api:"  # worker_id of inspections made by the API (how PostgreSQL tells them apart)


@dataclass
class InspectModel:
    """The loaded detector (and segmentation stage) the API inspects with."""

    detector: Any
    segmentation: Any
    model_uri: str
    max_pixels: int
    encodings: tuple[str, ...]
    worker_id: str


def load_model(settings: Settings, model_uri: str | None = None, store: Any = None) -> InspectModel:
    """The detector of ``model_uri`` (default: SQIS_MODEL_URI, else the demo model), warmed up."""
    from inference_workers.cli import default_model_uri
    from inference_workers.model_loader import load_detector
    from inference_workers.segment_stage import SegmentationStage

    uri = model_uri or default_model_uri(settings)
    det = load_detector(settings, uri)
    det.warmup(1)
    seg = SegmentationStage.from_settings(settings, uri, store)
    encs = tuple(e.strip().lower() for e in settings.worker_image_encodings.split(",") if e.strip())
    return InspectModel(det, seg, uri, settings.worker_max_pixels, encs, f"{API_WORKER_PREFIX}{socket.gethostname()}")


def inspect_image(model: InspectModel, data: bytes, meta: Mapping[str, Any]) -> dict[str, Any]:
    """An Inspection record (schemas/avro/inspection.avsc) for the encoded image ``data``.

    ``meta`` holds the FrameRef fields: frame_id, line_id, camera_id, seq, part_id, captured_at (µs),
    uri. Raises inference_workers.fetch.FrameError for an image the worker would refuse too.
    Not thread-safe (one detect() at a time): the caller serialises calls.
    """
    t0 = time.perf_counter()
    image = decode_image(data, max_pixels=model.max_pixels, encodings=model.encodings)
    t1 = time.perf_counter()
    det = model.detector
    batch, metas = det.preprocess([image])
    raw = det.infer(batch)
    t2 = time.perf_counter()
    dets = det.postprocess(raw, metas)[0]
    top = float(det.max_raw_scores(raw)[0])
    t3 = time.perf_counter()
    now_us = int(time.time() * 1e6)
    timings = Timings(queue_ms=0.0, fetch_ms=0.0, decode_ms=(t1 - t0) * 1000, infer_ms=(t2 - t1) * 1000,
                      postprocess_ms=(t3 - t2) * 1000, total_ms=(t3 - t0) * 1000)
    rec = build_inspection(meta, detections=dets, thresholds=det.thresholds, model_name=det.name,
                           model_version=det.version, timings=timings, inspected_at_us=now_us, batch_size=1,
                           worker_id=model.worker_id, source_partition=-1, source_offset=-1,
                           width=image.shape[1], height=image.shape[0],
                           image_stats=ImageStats(*image_stats(image), max_score=top))
    if model.segmentation is not None:
        model.segmentation.apply(rec, image, det.thresholds)
    return rec
