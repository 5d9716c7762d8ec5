"""The in-flight journal: what a producer has handed to Kafka but not seen acknowledged yet.

Up to ``max_in_flight`` FrameRefs wait in librdkafka's memory for the broker's ack; a kill -9 or a
power cut loses them (their objects are already in the store). Each is appended here (one JSON line,
page cache: survives kill -9; flushed to disk every ``fsync_every_s``: a power cut loses at most that
much) before it is produced, and acknowledged by a second line once delivered or spooled. A journal
whose owner died (no flock) is *recovered* by the next producer of the deployment: the frames it
names without an acknowledgement are fetched back from the object store into the spool (so they are
replayed in order, same frame_id) and counted; those whose object is gone are counted as lost.

Segments rotate every ``segment_records`` frames; a segment is deleted once all its frames are done.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import IO, Any

log = logging.getLogger(__name__)

SUFFIX = ".jrnl"


class InFlightJournal:
    """Append-only, segmented, owned (flock) journal of one producer process."""

    def __init__(self, directory: Path, owner: str, *, segment_records: int = 10_000,
                 fsync_every_s: float = 1.0) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.owner = "".join(c if c.isalnum() or c in "-_." else "_" for c in owner)
        self.segment_records = segment_records
        self.fsync_every_s = fsync_every_s
        self._lock = threading.Lock()
        self._segments: dict[Path, IO[bytes]] = {}
        self._open_count: dict[Path, int] = {}  # segment -> frames recorded and not yet acknowledged
        self._of: dict[str, Path] = {}  # frame_id -> its segment
        self._current: Path | None = None
        self._records = 0
        self._n = 0
        self._last_sync = time.monotonic()

    def _rotate(self) -> None:
        self._n += 1
        path = self.dir / f"{self.owner}-{os.getpid()}-{int(time.time() * 1e6)}-{self._n:04d}{SUFFIX}"
        f = open(path, "ab")  # noqa: SIM115 - held until the segment is done
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh name: never contended
        self._segments[path] = f
        self._open_count[path] = 0
        old, self._current, self._records = self._current, path, 0
        if old is not None and self._open_count.get(old) == 0:
            self._drop(old)

    def _drop(self, path: Path) -> None:
        f = self._segments.pop(path, None)
        self._open_count.pop(path, None)
        path.unlink(missing_ok=True)
        if f is not None:
            f.close()

    def _write(self, path: Path, line: bytes) -> None:
        f = self._segments[path]
        f.write(line)
        f.flush()  # into the page cache: a kill -9 cannot lose it
        if time.monotonic() - self._last_sync >= self.fsync_every_s:
            os.fsync(f.fileno())
            self._last_sync = time.monotonic()

    def record(self, ref: dict[str, Any]) -> None:
        """Before producing: the FrameRef (with its uri) that is about to be in flight."""
        line = b"+" + json.dumps(ref, separators=(",", ":"), default=str).encode() + b"\n"
        with self._lock:
            if self._current is None or self._records >= self.segment_records:
                self._rotate()
            assert self._current is not None
            self._write(self._current, line)
            self._records += 1
            self._open_count[self._current] += 1
            self._of[ref["frame_id"]] = self._current

    def done(self, frame_id: str) -> None:
        """Delivered, failed permanently, or spooled: no longer only in memory."""
        with self._lock:
            path = self._of.pop(frame_id, None)
            if path is None or path not in self._segments:
                return
            self._write(path, b"-" + frame_id.encode() + b"\n")
            self._open_count[path] -= 1
            if self._open_count[path] == 0 and path != self._current:
                self._drop(path)

    def pending(self) -> int:
        with self._lock:
            return len(self._of)

    def close(self) -> None:
        """Clean shutdown: segments with nothing pending are deleted; the rest stay for recovery."""
        with self._lock:
            for path in list(self._segments):
                if self._open_count.get(path, 0) == 0:
                    self._drop(path)
                else:
                    f = self._segments.pop(path)
                    with contextlib.suppress(OSError):
                        os.fsync(f.fileno())
                    f.close()
            self._current = None


def recover(directory: Path) -> tuple[list[dict[str, Any]], list[Path]]:
    """FrameRefs left unacknowledged by producers that died, and the journal files they came from.

    Journals whose owner is alive (flock held) are skipped. The caller deletes the returned files
    once it has made the frames durable elsewhere (the spool).
    """
    refs: dict[str, dict[str, Any]] = {}
    files: list[Path] = []
    if not Path(directory).is_dir():
        return [], []
    for path in sorted(Path(directory).glob(f"*{SUFFIX}")):
        with open(path, "rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # its producer is running
            try:
                for raw in f:
                    if raw.startswith(b"+") and raw.endswith(b"\n"):
                        with contextlib.suppress(ValueError):
                            ref = json.loads(raw[1:])
                            refs[ref["frame_id"]] = ref
                    elif raw.startswith(b"-"):
                        refs.pop(raw[1:].strip().decode("utf-8", "replace"), None)
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        files.append(path)
    return list(refs.values()), files
