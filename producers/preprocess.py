"""Edge preprocessing: resize, optional cheap denoise, near-duplicate skipping, JPEG encoding."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Literal

import cv2
import numpy as np

from producers.base import Frame, InvalidSourceError, TruthBox

log = logging.getLogger(__name__)

Denoise = Literal["none", "gaussian", "bilateral", "nlmeans"]
DENOISE_CHOICES: tuple[str, ...] = ("none", "gaussian", "bilateral", "nlmeans")


@dataclass
class EncodedFrame:
    """A frame ready to upload: its JPEG bytes and the FrameRef fields known before upload."""

    frame: Frame
    frame_id: str
    data: bytes
    width: int
    height: int
    sha256: str
    truth: list[TruthBox] | None


@dataclass
class Preprocessor:
    """Per-camera stateful preprocessing (the duplicate check compares with that camera's last kept frame).

    ``size`` resizes to exactly (W, H); else ``max_side`` shrinks so the longer side fits. Truth
    boxes are scaled with the image. ``dedup_threshold`` is the mean absolute difference of 16x16
    grey thumbnails (0-255 levels) under which a frame counts as a duplicate; 0 turns it off.
    """

    size: tuple[int, int] | None = None
    max_side: int | None = None
    denoise: Denoise = "none"
    dedup_threshold: float = 0.0
    jpeg_quality: int = 90
    skipped: int = 0
    _last: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.denoise not in DENOISE_CHOICES:
            raise InvalidSourceError(f"--denoise must be one of {', '.join(DENOISE_CHOICES)}, got {self.denoise!r}")
        if not 1 <= self.jpeg_quality <= 100:
            raise InvalidSourceError(f"--jpeg-quality must be within 1..100, got {self.jpeg_quality}")
        if self.dedup_threshold < 0:
            raise InvalidSourceError("--dedup-threshold must be >= 0")

    def resize(self, image: np.ndarray, truth: list[TruthBox] | None) -> tuple[np.ndarray, list[TruthBox] | None]:
        h, w = image.shape[:2]
        if self.size is not None:
            nw, nh = self.size
        elif self.max_side is not None and max(w, h) > self.max_side:
            scale = self.max_side / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        else:
            return image, truth
        if (nw, nh) == (w, h):
            return image, truth
        interp = cv2.INTER_AREA if nw < w else cv2.INTER_LINEAR
        out = cv2.resize(image, (nw, nh), interpolation=interp)
        if truth is not None:
            sx, sy = nw / w, nh / h
            truth = [(c, round(x1 * sx, 2), round(y1 * sy, 2), round(x2 * sx, 2), round(y2 * sy, 2))
                     for c, x1, y1, x2, y2 in truth]
        return out, truth

    def apply_denoise(self, image: np.ndarray) -> np.ndarray:
        if self.denoise == "gaussian":
            return cv2.GaussianBlur(image, (3, 3), 0)
        if self.denoise == "bilateral":
            return cv2.bilateralFilter(image, 5, 30, 5)
        if self.denoise == "nlmeans":  # the best and by far the slowest (~10x bilateral)
            return cv2.fastNlMeansDenoisingColored(image, None, 7, 7, 5, 11)
        return image

    def is_duplicate(self, camera_id: str, image: np.ndarray) -> bool:
        """True when ``image`` is within the threshold of the camera's last kept frame (then not kept)."""
        if self.dedup_threshold <= 0:
            return False
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
        thumb = cv2.resize(grey, (16, 16), interpolation=cv2.INTER_AREA).astype(np.float32)
        last = self._last.get(camera_id)
        if last is not None and float(np.abs(thumb - last).mean()) < self.dedup_threshold:
            return True
        self._last[camera_id] = thumb
        return False

    def encode(self, image: np.ndarray) -> bytes:
        ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
        if not ok:
            raise ValueError("JPEG encoding failed")
        return buf.tobytes()

    def process(self, frame: Frame, frame_id: str) -> EncodedFrame | None:
        """The whole chain; None when the frame is a near-duplicate (counted in ``skipped``)."""
        image, truth = self.resize(frame.image, frame.truth)
        if self.is_duplicate(frame.camera_id, image):
            self.skipped += 1
            log.debug("duplicate frame skipped", extra={"camera_id": frame.camera_id, "seq": frame.seq})
            return None
        image = self.apply_denoise(image)
        data = self.encode(image)
        h, w = image.shape[:2]
        return EncodedFrame(frame, frame_id, data, w, h, hashlib.sha256(data).hexdigest(), truth)


def parse_size(text: str) -> tuple[int, int]:
    """'WxH' (or a single 'N' for a square) -> (W, H); anything else -> InvalidSourceError."""
    t = text.strip().lower()
    parts = t.split("x") if "x" in t else [t, t]
    try:
        w, h = (int(p) for p in parts)
    except ValueError:
        raise InvalidSourceError(f"--size must look like 320x320, got {text!r}") from None
    if len(parts) != 2 or w < 1 or h < 1 or w > 16384 or h > 16384:
        raise InvalidSourceError(f"--size must look like 320x320 with sides 1..16384, got {text!r}")
    return w, h
