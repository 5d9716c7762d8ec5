"""Event-time defect-rate windows: tumbling windows on ``captured_at`` with a grace period, a sliding
view over the last N closed windows, and late frames counted (and still recorded), never dropped silently.

Pure logic, no Kafka: the stream loop feeds Inspection dicts in and publishes what comes out.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

US = 1_000_000
ALL = ""  # '' means "all" in a key column (line-level / any class), as in migration 002

RateKey = tuple[str, str, str]  # (line_id, camera_id or '', class_name or '')


@dataclass
class WindowCounts:
    """Counts of one key in one tumbling window."""

    frames: int = 0
    fails: int = 0
    defects: int = 0
    late: int = 0
    latencies: list[float] = field(default_factory=list)  # total_ms samples (capped) for p95
    examples: list[str] = field(default_factory=list)  # a few FAIL frame_ids (why an alert fired)
    closed_p95: float | None = None  # kept instead of the samples once the window closed (memory)

    def p95(self) -> float | None:
        if self.closed_p95 is not None:
            return self.closed_p95
        if not self.latencies:
            return None
        s = sorted(self.latencies)
        return s[min(len(s) - 1, int(0.95 * (len(s) - 1) + 0.5))]


@dataclass(frozen=True)
class RateRecord:
    """One window's numbers for one key: the payload of topic ``defect-rates``."""

    line_id: str
    camera_id: str
    class_name: str
    window_start_us: int
    window_s: int
    frames: int
    fails: int
    defects: int
    late: int
    p95_latency_ms: float | None
    final: bool  # False for an update of a window re-emitted because of late frames
    examples: tuple[str, ...] = ()

    @property
    def rate(self) -> float:
        return self.fails / self.frames if self.frames else 0.0

    @property
    def key(self) -> RateKey:
        return (self.line_id, self.camera_id, self.class_name)

    def to_avro(self) -> dict[str, Any]:
        return {
            "line_id": self.line_id, "camera_id": self.camera_id, "class_name": self.class_name,
            "window_start": self.window_start_us, "window_s": self.window_s, "frames": self.frames,
            "fails": self.fails, "defects": self.defects, "late": self.late, "rate": self.rate,
            "p95_latency_ms": self.p95_latency_ms, "final": self.final,
            "example_frame_ids": list(self.examples),
        }


MAX_LATENCY_SAMPLES = 512
MAX_EXAMPLES = 5


def inspection_keys(rec: dict[str, Any]) -> tuple[list[RateKey], list[RateKey]]:
    """(keys the frame counts in, keys where it counts as a fail). Scopes: line, camera, class."""
    line, cam = rec["line_id"], rec["camera_id"]
    keys: list[RateKey] = [(line, ALL, ALL), (line, cam, ALL)]
    failing = rec["verdict"] == "FAIL"
    fail_keys = list(keys) if failing else []
    if failing:
        for cls in sorted({d["class_name"] for d in rec.get("detections") or ()}):
            fail_keys.append((line, ALL, cls))
    return keys, fail_keys


class RateWindows:
    """Tumbling event-time windows per (line, camera, class) plus a sliding view.

    A window closes when the watermark minus ``grace_s`` passes its end, or when the stream has been
    idle for ``idle_close_s`` of wall time (``tick``). With several sources (Kafka partitions, whose
    event times are skewed: each camera is one partition) the watermark is the smallest of the
    sources' largest ``captured_at``. A source silent for ``source_idle_s`` stops holding it back (a
    stopped camera must not stall the line's windows) -- but only while the stream is live, i.e. its
    newest event is within ``live_lag_s`` of the wall clock. While catching up on a backlog the
    brokers serve partitions one after the other, and a partition waiting its turn (or registered
    and not heard from yet) must keep holding the watermark, or its frames would all arrive late. A frame
    for a closed window that is still retained is added and the window re-emitted (``late`` +1); a
    frame older than ``retention_s`` is counted in ``too_old`` (the inspection itself is still in
    the inspections table). State is bounded: closed windows are kept ``retention_s``.
    """

    def __init__(self, window_s: int = 60, grace_s: int = 30, sliding_windows: int = 15,
                 retention_s: int = 3 * 3600, idle_close_s: float = 5.0, source_idle_s: float = 10.0,
                 live_lag_s: float = 120.0, wall_clock: Callable[[], float] = time.time) -> None:
        if window_s <= 0 or grace_s < 0 or sliding_windows < 0:
            raise ValueError("window_s > 0, grace_s >= 0 and sliding_windows >= 0 (0: no sliding view) are required")
        self.window_us = window_s * US
        self.window_s = window_s
        self.grace_us = grace_s * US
        self.sliding = sliding_windows
        self.retention_us = max(retention_s * US, (sliding_windows + 1) * self.window_us)
        self.idle_close_s = idle_close_s
        self.watermark_us = 0  # event-time watermark (see the class docstring)
        self.max_event_us = 0  # largest captured_at seen
        self.source_idle_s = source_idle_s
        self.live_lag_us = int(live_lag_s * US)
        self.wall_clock = wall_clock
        self._src_max: dict[Any, int] = {}
        self._src_seen: dict[Any, float] = {}
        self.open: dict[int, dict[RateKey, WindowCounts]] = {}
        self.closed: OrderedDict[int, dict[RateKey, WindowCounts]] = OrderedDict()
        self.history: dict[RateKey, deque[tuple[int, int, int, int]]] = {}  # (start, frames, fails, defects)
        self.late_frames = 0
        self.too_old = 0
        self.processed = 0
        self._last_input = 0.0

    # ---- input ---------------------------------------------------------------------------------
    def register_source(self, source: Any, now: float) -> None:
        """A source (partition) that will deliver: it holds the watermark until heard from or idle."""
        self._src_max.setdefault(source, -1)
        self._src_seen[source] = now

    def forget_source(self, source: Any) -> None:
        self._src_max.pop(source, None)
        self._src_seen.pop(source, None)

    def _watermark(self, now: float) -> int:
        if not self._src_max:
            return self.max_event_us
        live = self.max_event_us >= self.wall_clock() * US - self.live_lag_us
        if not live:
            return min(self._src_max.values())
        active = [m for src, m in self._src_max.items() if now - self._src_seen[src] < self.source_idle_s]
        return min(active) if active else self.max_event_us

    def add(self, rec: dict[str, Any], now: float = 0.0, source: Any = None) -> list[RateRecord]:
        """Count one Inspection from ``source``; returns the records emitted (closed windows, late updates)."""
        ts = int(rec["captured_at"])
        start = ts - ts % self.window_us
        self.processed += 1
        self._last_input = now
        keys, fail_keys = inspection_keys(rec)
        n_def = len(rec.get("detections") or ())
        lat = (rec.get("timings") or {}).get("total_ms")
        out: list[RateRecord] = []
        if start in self.open or (start not in self.closed and start + self.window_us + self.grace_us > self.watermark_us):
            bucket = self.open.setdefault(start, {})
            self._count(bucket, keys, fail_keys, n_def, lat, rec, late=False)
        elif start in self.closed or start >= self.max_event_us - self.retention_us:
            # late: the window closed (or closed empty, never opened) but is still retained
            bucket = self.closed.get(start)
            if bucket is None:
                bucket = self.closed[start] = {}
                self.closed = OrderedDict(sorted(self.closed.items()))
            self.late_frames += 1
            touched = self._count(bucket, keys, fail_keys, n_def, lat, rec, late=True)
            out.extend(self._record(k, start, bucket, final=False) for k in touched)
            for k in touched:
                self._history_update(k, start, bucket[k])
        else:
            self.too_old += 1
        self.max_event_us = max(self.max_event_us, ts)
        self._src_max[source] = max(self._src_max.get(source, -1), ts)
        self._src_seen[source] = now
        wm = self._watermark(now)
        if wm > self.watermark_us:
            self.watermark_us = wm
            out.extend(self._close_until(self.watermark_us - self.grace_us))
        return out

    def tick(self, now: float) -> list[RateRecord]:
        """Wall-clock housekeeping: after ``idle_close_s`` without input, close every open window."""
        if self.open and now - self._last_input >= self.idle_close_s:
            return self._close_until(max(self.open) + self.window_us)
        wm = self._watermark(now)  # a source went idle: the others may move the watermark now
        if wm > self.watermark_us:
            self.watermark_us = wm
            return self._close_until(self.watermark_us - self.grace_us)
        return []

    def flush(self) -> list[RateRecord]:
        """Close everything (shutdown)."""
        return self._close_until(max(self.open) + self.window_us) if self.open else []

    # ---- internals -----------------------------------------------------------------------------
    def _count(self, bucket: dict[RateKey, WindowCounts], keys: list[RateKey], fail_keys: list[RateKey],
               n_def: int, lat: float | None, rec: dict[str, Any], *, late: bool) -> list[RateKey]:
        for k in keys:
            c = bucket.get(k)
            if c is None:
                c = bucket[k] = WindowCounts()
            c.frames += 1
            if late:
                c.late += 1
            if lat is not None and len(c.latencies) < MAX_LATENCY_SAMPLES:
                c.latencies.append(float(lat))
        for k in fail_keys:
            c = bucket.get(k)
            if c is None:  # class keys: frames there are the line's frames (filled at close)
                c = bucket[k] = WindowCounts()
            c.fails += 1
            if k[2]:
                c.defects += sum(1 for d in rec.get("detections") or () if d["class_name"] == k[2])
            else:
                c.defects += n_def
            if len(c.examples) < MAX_EXAMPLES:
                c.examples.append(rec["frame_id"])
        return sorted(set(keys) | set(fail_keys))

    def _close_until(self, limit_us: int) -> list[RateRecord]:
        out: list[RateRecord] = []
        for start in sorted(s for s in self.open if s + self.window_us <= limit_us):
            bucket = self.open.pop(start)
            self.closed[start] = bucket
            for k in sorted(bucket):
                out.append(self._record(k, start, bucket, final=True))
                self._history_update(k, start, bucket[k])
            for c in bucket.values():
                c.closed_p95, c.latencies = c.p95(), []
            if self.sliding:
                out.extend(self._sliding(start, bucket))
        self._expire()
        return out

    def _record(self, k: RateKey, start: int, bucket: dict[RateKey, WindowCounts], *, final: bool) -> RateRecord:
        c = bucket[k]
        # a class key's denominator is every frame of its line in that window
        base = bucket.get((k[0], ALL, ALL), c) if k[2] else c
        return RateRecord(k[0], k[1], k[2], start, self.window_s, base.frames, c.fails,
                          c.defects, base.late if k[2] else c.late, base.p95() if not k[2] else None,
                          final, tuple(c.examples))

    def _history_update(self, k: RateKey, start: int, c: WindowCounts) -> None:
        if not self.sliding:
            return
        h = self.history.setdefault(k, deque(maxlen=self.sliding))
        for i, (s, *_rest) in enumerate(h):
            if s == start:
                h[i] = (start, c.frames, c.fails, c.defects)
                return
        h.append((start, c.frames, c.fails, c.defects))
        if len(h) > 1 and h[-2][0] > start:  # a late window re-entering: keep the deque in time order
            items = sorted(h)
            h.clear()
            h.extend(items)

    def _sliding(self, start: int, bucket: dict[RateKey, WindowCounts]) -> list[RateRecord]:
        """The sliding view ending with the window that just closed: one record per key of that window."""
        out = []
        lo = start - (self.sliding - 1) * self.window_us
        for k in sorted(bucket):
            pts = [p for p in self.history.get(k, ()) if p[0] >= lo]
            src = self.history.get((k[0], ALL, ALL), ()) if k[2] else pts
            frames = sum(p[1] for p in src if p[0] >= lo)
            out.append(RateRecord(k[0], k[1], k[2], lo, self.sliding * self.window_s, frames,
                                  sum(p[2] for p in pts), sum(p[3] for p in pts), 0, None, True))
        return out

    def _expire(self) -> None:
        horizon = self.max_event_us - self.retention_us
        while self.closed and next(iter(self.closed)) < horizon:
            self.closed.popitem(last=False)
        for k in [k for k, h in self.history.items() if h and h[-1][0] < horizon]:
            del self.history[k]

    def state_size(self) -> int:
        return sum(len(b) for b in self.open.values()) + sum(len(b) for b in self.closed.values())
