"""Video camera: a file, an rtsp:// / http:// stream or a USB device through cv2.VideoCapture.

A stream that drops or fails to open is reopened with bounded, jittered exponential backoff
(counted in ``reconnects``); a file ends at EOF unless ``loop``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from producers.base import Backoff, Frame, InvalidSourceError, SourceUnavailable, now_us

log = logging.getLogger(__name__)

STREAM_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "udp://", "tcp://")


class Capture(Protocol):
    """The part of cv2.VideoCapture the sources use (tests inject fakes)."""

    def isOpened(self) -> bool: ...  # noqa: N802
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def release(self) -> None: ...


CaptureFactory = Callable[[Any], Capture]


def is_stream(uri: str) -> bool:
    return uri.lower().startswith(STREAM_SCHEMES)


class VideoSource:
    """Frames from ``cv2.VideoCapture(target)``; ``live`` sources reconnect forever by default.

    ``count`` caps the frames yielded (0: until EOF / forever). ``capture_factory`` builds the
    capture (default cv2.VideoCapture) so tests can simulate failing devices.
    """

    def __init__(self, target: str | int, camera_id: str = "cam-01", line_id: str = "line-1", *,
                 loop: bool = False, count: int = 0, live: bool | None = None,
                 capture_factory: CaptureFactory | None = None, backoff: Backoff | None = None) -> None:
        self.target = target
        self.live = live if live is not None else (isinstance(target, int) or is_stream(str(target)))
        if not self.live and capture_factory is None and not Path(str(target)).is_file():
            raise InvalidSourceError(f"--path {target} is not a video file (or an rtsp:// URL)")
        if not self.live and capture_factory is None:  # a file that is there opens or never will
            probe = cv2.VideoCapture(str(target))
            ok = probe.isOpened()
            probe.release()
            if not ok:
                raise InvalidSourceError(f"--path {target}: not a video file OpenCV can read")
        self.camera_id, self.line_id = camera_id, line_id
        self.loop, self.count = loop, count
        self.factory: CaptureFactory = capture_factory or cv2.VideoCapture
        # files: a few quick retries (the file is there or not); streams: forever, up to 30 s apart
        self.backoff = backoff or (Backoff(0.5, 2.0, 30.0, None) if self.live else Backoff(0.2, 2.0, 2.0, 5))
        self.reconnects = 0
        self.failed_reads = 0
        self._cap: Capture | None = None

    def _open(self, stop: threading.Event) -> Capture | None:
        """Open the capture, retrying with backoff; None when stopped or the budget is spent."""
        while not stop.is_set():
            try:
                cap = self.factory(self.target)
                if cap.isOpened():
                    return cap
                cap.release()
                reason = "not opened"
            except Exception as exc:  # a capture backend can raise anything
                reason = f"{type(exc).__name__}: {exc}"
            delay = self.backoff.next_delay()
            if delay is None:
                raise SourceUnavailable(
                    f"cannot open {self.target} after {self.backoff.attempts} attempts ({reason})")
            self.reconnects += 1
            log.warning("capture unavailable, retrying", extra={
                "camera_id": self.camera_id, "target": str(self.target), "reason": reason,
                "attempt": self.backoff.attempts, "delay_s": round(delay, 2)})
            stop.wait(delay)
        return None

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        seq = 0
        while not stop.is_set():
            cap = self._cap = self._open(stop)
            if cap is None:
                return
            got_any = False
            while not stop.is_set():
                if self.count > 0 and seq >= self.count:
                    self.close()
                    return
                try:
                    ok, img = cap.read()
                except Exception as exc:
                    log.warning("capture read raised", extra={"camera_id": self.camera_id, "error": str(exc)})
                    ok, img = False, None
                if not ok or img is None:
                    break
                if not got_any:
                    self.backoff.reset()  # a healthy read ends the outage
                got_any = True
                if img.ndim == 2:
                    img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
                yield Frame(self.camera_id, self.line_id, seq, now_us(), img, None)
                seq += 1
            self.close()
            if stop.is_set():
                return
            if not self.live:
                if not got_any:
                    raise SourceUnavailable(f"{self.target} opened but yields no frames (corrupt or empty video?)")
                if self.loop:
                    continue
                return
            delay = self.backoff.next_delay()
            if delay is None:
                raise SourceUnavailable(f"stream {self.target} dropped and the reconnect budget is spent")
            self.reconnects += 1
            log.warning("stream dropped, reconnecting", extra={
                "camera_id": self.camera_id, "target": str(self.target), "delay_s": round(delay, 2)})
            stop.wait(delay)

    def close(self) -> None:
        if self._cap is not None:
            try:
                self._cap.release()
            finally:
                self._cap = None
