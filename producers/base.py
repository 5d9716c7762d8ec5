"""What every camera source yields (`Frame`), the source protocol, and the package's errors."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from typing import Protocol, runtime_checkable

import numpy as np

CLASS_NAMES: tuple[str, ...] = ("scratch", "dent", "spot")
"""Defect classes of the synthetic parts, in YOLO class-id order."""

TruthBox = tuple[str, float, float, float, float]
"""(class_name, x1, y1, x2, y2) in pixels of the frame's image."""


class ProducerError(Exception):
    """Root of the producers package's errors."""


class InvalidSourceError(ProducerError):
    """A source cannot be built from the user's input (missing folder, bad size, unknown kind)."""


class SourceUnavailable(ProducerError):
    """A capture device or stream could not be (re)opened within its reconnect budget."""


@dataclass
class Frame:
    """One captured image with its identity; ``truth`` is None unless the source knows it."""

    camera_id: str
    line_id: str
    seq: int
    captured_at_us: int
    image: np.ndarray  # HxWx3 BGR uint8
    truth: list[TruthBox] | None = None
    part_id: str | None = None
    trigger_id: str | None = None


@runtime_checkable
class FrameSource(Protocol):
    """A camera: yields frames until exhausted or ``stop`` is set; counts its reconnects."""

    camera_id: str
    line_id: str
    reconnects: int
    failed_reads: int

    def frames(self, stop: threading.Event) -> Iterator[Frame]: ...

    def close(self) -> None: ...


def now_us() -> int:
    """Wall-clock time in microseconds since the epoch (UTC)."""
    return time.time_ns() // 1000


@dataclass
class Backoff:
    """Bounded exponential backoff with jitter: delay n is U(0.5, 1) * min(cap, base * factor**n)."""

    base_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    max_attempts: int | None = None  # None: retry forever (live streams)
    attempts: int = 0
    _rng: random.Random = field(default_factory=random.Random, repr=False)

    def next_delay(self) -> float | None:
        """The next delay in seconds, or None once ``max_attempts`` is spent."""
        if self.max_attempts is not None and self.attempts >= self.max_attempts:
            return None
        d = min(self.cap_s, self.base_s * self.factor ** min(self.attempts, 32))
        self.attempts += 1
        return d * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempts = 0


@dataclass
class Counters:
    """Integer counters several threads add to; subclasses declare them as dataclass fields."""

    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
