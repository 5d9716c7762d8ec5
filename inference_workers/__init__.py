"""inference_workers package."""

import os as _os

# OpenCV reads its decoder ceiling once, when cv2 is loaded, and allows 2^30 pixels (3 GB per BGR frame)
# by default. Lower it before anything in the worker imports cv2; fetch.probe_image enforces the
# configured budget (SQIS_WORKER_MAX_PIXELS) first, this is the second line of defence.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(64 * 1024 * 1024))
