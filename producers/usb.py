"""USB camera: ``cv2.VideoCapture(index)`` with the video source's reconnect logic."""

from __future__ import annotations

from producers.base import Backoff, InvalidSourceError
from producers.video import CaptureFactory, VideoSource


class UsbSource(VideoSource):
    """A local camera by device index; reconnects forever (bounded delays) when unplugged."""

    def __init__(self, device: int = 0, camera_id: str = "cam-01", line_id: str = "line-1", *,
                 count: int = 0, capture_factory: CaptureFactory | None = None,
                 backoff: Backoff | None = None) -> None:
        if device < 0:
            raise InvalidSourceError(f"--device must be >= 0, got {device}")
        super().__init__(device, camera_id, line_id, count=count, live=True,
                         capture_factory=capture_factory, backoff=backoff)
