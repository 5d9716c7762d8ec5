"""Camera drift: per camera, 1-minute means of the cheap image statistics (brightness, contrast,
sharpness) and of model confidence (max_score), each watched by a two-sided CUSUM against a
reference that keeps learning.

The reference starts from the first ``ref_points`` windows and then keeps learning from every point on
which the CUSUM is quiet: a running mean of all of them, then (after ``horizon`` points) an
exponential average with that memory. A reference frozen after the first hour was the cause of
repeated false alerts: the minute means wander with a memory of about an hour (lighting, temperature),
so one hour's mean can sit half a unit off the camera's true level, and the CUSUM then crossed h on
every ordinary excursion to that side, re-firing after each cooldown for weeks. Learning stops as soon
as a CUSUM accumulates, so a step or a ramp is not absorbed into the reference it is measured against.

Shifts are measured in units of ``max(σ_ref, rel_floor·|μ_ref|, abs_floor)``, σ_ref taken at its 95 %
upper confidence bound (from 6 reference windows, as the demo uses, the sample σ was half the real
one on cam-04 and its sharpness alerted on ordinary frames). σ_ref alone (the spread
of 1-minute means, tiny at 600 frames a minute) would flag changes nobody can see, so a shift must
also be a few percent of the reference level to count. The defaults (processors.DriftConfig) keep a
4x4 plant's false drift alerts under 2 a week in ``sqis bench alerts`` while a 10 % lighting change is
flagged within minutes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Side = Literal["upper", "lower", "both"]

US = 1_000_000
STATS = ("brightness", "contrast", "sharpness", "max_score")
ABS_FLOOR = {"brightness": 1.5, "contrast": 0.75, "sharpness": 0.0, "max_score": 0.02}
# Model confidence rises whenever defects become common (the SPC chart reports that); only a fall, the
# images leaving what the model was trained on, is camera drift.
SIDE: dict[str, Side] = {"max_score": "lower"}


_SD_UPPER_SMALL = {2: 15.947, 3: 4.415, 4: 2.920, 5: 2.372}


def sd_upper_factor(n: int) -> float:
    """σ's one-sided 95 % upper confidence bound over the sample σ of n points: √((n−1)/χ²₀.₀₅(n−1)),
    χ² by Wilson–Hilferty. A short reference underestimates σ as often as not (6 points, the demo's:
    half the time by 25 % or more), and an underestimated σ makes ordinary points look like a drift."""
    if n < 6:  # Wilson–Hilferty is poor below 5 degrees of freedom: exact values
        return _SD_UPPER_SMALL.get(n, 15.947)
    k = n - 1
    q = k * (1 - 2 / (9 * k) - 1.6449 * math.sqrt(2 / (9 * k))) ** 3
    return math.sqrt(k / q)


@dataclass
class Cusum:
    """Two-sided tabular CUSUM on standardised points; the reference starts from the first
    ``ref_points`` and keeps learning from quiet points (``horizon`` 0: frozen after ``ref_points``).
    ``side`` is the direction that fires; the other side's CUSUM only pauses the learning."""

    ref_points: int = 30
    k: float = 0.5
    h: float = 12.0
    rel_floor: float = 0.03
    abs_floor: float = 0.0
    horizon: int = 10_080
    side: Side = "both"
    _ref: list[float] = field(default_factory=list)
    mu: float | None = None
    scale: float | None = None
    sd: float = 0.0
    learned: int = 0  # points in the reference (capped at horizon)
    s_hi: float = 0.0
    s_lo: float = 0.0

    @property
    def ready(self) -> bool:
        return self.mu is not None

    def z(self, x: float) -> float:
        assert self.mu is not None and self.scale is not None
        return (x - self.mu) / self.scale

    def add(self, x: float) -> tuple[float, int]:
        """Feed one point; returns (z, +1/-1 when the CUSUM crosses h above/below, else 0)."""
        if not math.isfinite(x):
            return 0.0, 0
        if self.mu is None:
            self._ref.append(x)
            if len(self._ref) >= self.ref_points:
                n = len(self._ref)
                mu = sum(self._ref) / n
                sd = math.sqrt(sum((v - mu) ** 2 for v in self._ref) / max(1, n - 1))
                self.mu, self.sd, self.learned = mu, sd * sd_upper_factor(n), n
                self._set_scale()
                self._ref = []
            return 0.0, 0
        z = self.z(x)
        self.s_hi = max(0.0, self.s_hi + z - self.k)
        self.s_lo = max(0.0, self.s_lo - z - self.k)
        if self.s_hi > self.h:
            self.s_hi = self.s_lo = 0.0
            return z, (1 if self.side != "lower" else 0)
        if self.s_lo > self.h:
            self.s_hi = self.s_lo = 0.0
            return z, (-1 if self.side != "upper" else 0)
        if self.horizon > 0 and self.s_hi == 0.0 and self.s_lo == 0.0:
            self.learned = min(self.learned + 1, max(self.horizon, self.ref_points))
            self.mu += (x - self.mu) / self.learned
            self._set_scale()
        return z, 0

    def _set_scale(self) -> None:
        # sd stays the reference's: re-estimating it from quiet points (|z| <= k) would shrink it
        assert self.mu is not None
        self.scale = max(self.sd, self.rel_floor * abs(self.mu), self.abs_floor, 1e-9)


@dataclass(frozen=True)
class DriftPoint:
    camera_id: str
    line_id: str
    stat: str
    window_start_us: int
    window_s: int
    n: int
    value: float
    z: float
    direction: int  # +1 / -1 when the detector fired on this point, else 0
    reference: float | None
    scale: float | None


@dataclass
class _CamWindow:
    start_us: int = -1
    n: int = 0
    sums: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STATS, 0.0))
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATS, 0))


class DriftMonitor:
    """Per-camera 1-minute statistic means -> one CUSUM per (camera, statistic).

    Inspections of one camera arrive in order (the topic is keyed by camera_id); a frame of an
    earlier window than the camera's current one is counted in ``late`` and not used.
    """

    def __init__(self, *, window_s: int = 60, min_n: int = 20, ref_points: int = 30, k: float = 0.5,
                 h: float = 12.0, rel_floor: float = 0.03, horizon: int = 10_080, stats: tuple[str, ...] = STATS,
                 sides: dict[str, Side] | None = None, max_cameras: int = 4096, idle_close_s: float = 30.0) -> None:
        self.window_us = window_s * US
        self.window_s = window_s
        self.min_n = min_n
        self.params = {"ref_points": ref_points, "k": k, "h": h, "rel_floor": rel_floor, "horizon": horizon}
        self.sides = SIDE if sides is None else sides
        self.stats = stats
        self.max_cameras = max_cameras
        self.windows: dict[str, _CamWindow] = {}
        self.lines: dict[str, str] = {}
        self.detectors: dict[tuple[str, str], Cusum] = {}
        self.late = 0
        self.no_stats = 0
        self.idle_close_s = idle_close_s
        self._last_seen: dict[str, float] = {}

    def detector(self, cam: str, stat: str) -> Cusum:
        d = self.detectors.get((cam, stat))
        if d is None:
            d = self.detectors[(cam, stat)] = Cusum(abs_floor=ABS_FLOOR.get(stat, 0.0),
                                                       side=self.sides.get(stat, "both"), **self.params)  # type: ignore[arg-type]
        return d

    def add(self, rec: dict[str, Any], now: float = 0.0) -> list[DriftPoint]:
        st = rec.get("image_stats")
        cam = rec["camera_id"]
        self._last_seen[cam] = now
        if st is None:
            self.no_stats += 1
            return []
        ts = int(rec["captured_at"])
        start = ts - ts % self.window_us
        w = self.windows.get(cam)
        out: list[DriftPoint] = []
        if w is None:
            if len(self.windows) >= self.max_cameras:
                raise RuntimeError(f"more than {self.max_cameras} cameras: raise max_cameras")
            w = self.windows[cam] = _CamWindow(start)
        elif start < w.start_us:
            self.late += 1
            return []
        elif start > w.start_us:
            out = self._close(cam, w)
            w = self.windows[cam] = _CamWindow(start)
        self.lines[cam] = rec["line_id"]
        w.n += 1
        for s in self.stats:
            v = st.get(s)
            if v is not None and math.isfinite(v):
                w.sums[s] += float(v)
                w.counts[s] += 1
        return out

    def add_means(self, cam: str, line: str, start_us: int, n: int, means: dict[str, float]) -> list[DriftPoint]:
        """Feed one window's means directly (the benchmark's simulated cameras use this)."""
        self.lines[cam] = line
        out = []
        for s in self.stats:
            if s in means:
                d = self.detector(cam, s)
                z, direction = d.add(means[s])
                out.append(DriftPoint(cam, line, s, start_us, self.window_s, n, means[s], z, direction, d.mu, d.scale))
        return out

    def _close(self, cam: str, w: _CamWindow) -> list[DriftPoint]:
        if w.n < self.min_n:
            return []
        means = {s: w.sums[s] / w.counts[s] for s in self.stats if w.counts[s]}
        return self.add_means(cam, self.lines.get(cam, ""), w.start_us, w.n, means)

    def close_idle(self, now: float) -> list[DriftPoint]:
        """Close the window of every camera silent for ``idle_close_s`` (a stopped camera's last
        window is counted, and no longer holds back the offsets)."""
        out = []
        for cam in [c for c in self.windows if now - self._last_seen.get(c, now) >= self.idle_close_s]:
            out.extend(self._close(cam, self.windows.pop(cam)))
        return out

    def flush(self) -> list[DriftPoint]:
        out = []
        for cam, w in list(self.windows.items()):
            out.extend(self._close(cam, w))
            del self.windows[cam]
        return out
