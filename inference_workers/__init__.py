"""inference_workers package.

``inspect_one`` / ``load_served`` (inference_workers/inference.py): one image -> Detections -> verdict ->
Inspection record, outside the worker; imported lazily (the package import stays light)."""

import os as _os

# OpenCV reads its decoder ceiling once, when cv2 is loaded, and allows 2^30 pixels (3 GB per BGR frame)
# by default. Lower it before anything in the worker imports cv2; fetch.probe_image enforces the
# configured budget (SQIS_WORKER_MAX_PIXELS) first, this is the second line of defence.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))


def __getattr__(name: str) -> object:
    if name in ("inspect_one", "load_served"):
        from inference_workers import inference

        return getattr(inference, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
