"""The one place the API touches the model: an image in, an Inspection record out.

POST /v1/inspect runs the worker's own one-image path, :func:`inference_workers.inspect_one` on the
model :func:`inference_workers.load_served` builds (the detector and segmenter a worker would serve for
these settings) with the worker's ``VerdictPolicy``: the same decoding and pixel budget, masks, verdict
and record as the line, so the two cannot drift apart.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from infra.settings import Settings

API_WORKER_PREFIX = "api:"  # worker_id of inspections made by the API (how PostgreSQL tells them apart)


@dataclass
class InspectModel:
    """The served model (detector and segmenter) and verdict policy the API inspects with."""

    served: Any  # inference_workers.inference.FrameDetector
    policy: Any  # inference_workers.inference.VerdictPolicy
    model_uri: str
    max_pixels: int
    encodings: tuple[str, ...]
    worker_id: str
    store: Any = None  # label images (masks) go here, as the worker's do

    @property
    def detector(self) -> Any:
        """The bare detector under the served model."""
        return getattr(self.served, "det", self.served)


def load_model(settings: Settings, model_uri: str | None = None, store: Any = None) -> InspectModel:
    """The served model of ``model_uri`` (default: SQIS_MODEL_URI, else the demo model), warmed up."""
    from inference_workers import load_served
    from inference_workers.cli import default_model_uri
    from inference_workers.inference import VerdictPolicy

    uri = model_uri or default_model_uri(settings)
    served = load_served(settings, uri)
    warmup = getattr(getattr(served, "det", None), "warmup", None)
    if warmup is not None:
        warmup(1)
    encs = tuple(e.strip().lower() for e in settings.worker_image_encodings.split(",") if e.strip())
    return InspectModel(served, VerdictPolicy.from_settings(settings), uri, settings.worker_max_pixels, encs,
                        f"{API_WORKER_PREFIX}{socket.gethostname()}", store)


def inspect_image(model: InspectModel, data: bytes, meta: Mapping[str, Any]) -> dict[str, Any]:
    """An Inspection record (schemas/avro/inspection.avsc) for the encoded image ``data``.

    ``meta`` holds the FrameRef fields: frame_id, line_id, camera_id, seq, part_id, captured_at (µs),
    uri. Raises inference_workers.fetch.FrameError for an image the worker would refuse too.
    Not thread-safe (one detect() at a time): the caller serialises calls.
    """
    from inference_workers import inspect_one

    return inspect_one(data, meta, model.served, policy=model.policy, store=model.store, worker_id=model.worker_id,
                       max_pixels=model.max_pixels, encodings=model.encodings)
