"""The inference_workers package's one exception root (the app maps its subclasses to exit codes)."""

from __future__ import annotations


class InferenceError(RuntimeError):
    """Root of the package's errors: DetectorError (model), FrameError (one frame), WorkerError (the loop)."""
