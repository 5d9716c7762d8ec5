"""Folder camera: replays a directory of images in name order, optionally looping."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import cv2

from producers.base import Frame, InvalidSourceError, now_us

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})


def list_images(path: Path) -> list[Path]:
    """The folder's images (jpg/png/bmp, any case), sorted by name; non-recursive."""
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


class FolderSource:
    """Yields each image of ``path`` in name order; ``loop`` starts over at the end.

    ``count`` caps the frames yielded (0: the folder once, or forever when looping). Unreadable
    files are logged, counted in ``failed_reads`` and skipped.
    """

    def __init__(self, path: str | Path, camera_id: str = "cam-01", line_id: str = "line-1", *,
                 loop: bool = False, count: int = 0) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise InvalidSourceError(f"--path {self.path} is not a directory")
        self.files = list_images(self.path)
        if not self.files:
            raise InvalidSourceError(f"--path {self.path} holds no .jpg/.png/.bmp images")
        self.camera_id, self.line_id = camera_id, line_id
        self.loop, self.count = loop, count
        self.reconnects = 0
        self.failed_reads = 0

    def frames(self, stop: threading.Event) -> Iterator[Frame]:
        seq = 0
        while not stop.is_set():
            yielded_this_pass = 0
            for f in self.files:
                if stop.is_set() or (self.count > 0 and seq >= self.count):
                    return
                img = cv2.imread(str(f), cv2.IMREAD_COLOR)
                if img is None:
                    self.failed_reads += 1
                    log.warning("unreadable image skipped", extra={"camera_id": self.camera_id, "file": str(f)})
                    continue
                yield Frame(self.camera_id, self.line_id, seq, now_us(), img, None, part_id=f.stem)
                seq += 1
                yielded_this_pass += 1
            if not self.loop or yielded_this_pass == 0:
                return

    def close(self) -> None:
        pass
