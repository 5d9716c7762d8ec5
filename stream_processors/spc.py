"""Statistical process control for defect rates: a p-chart with variable subgroup size, limits from a
baseline (or a documented warm-up), the Western Electric run rules (selectable) and a plain threshold.

Pure arithmetic on points (n inspections, d fails); the same code runs in the stream processor and in
``sqis bench alerts``.
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

Side = Literal["upper", "lower", "both"]


@dataclass(frozen=True)
class Baseline:
    """Centre line of a p-chart: p̄ = Σd / Σn over an in-control period; ``sigma_z`` is Laney's
    overdispersion factor (1.0 = plain binomial p-chart)."""

    p_bar: float
    frames: int
    fails: int
    sigma_z: float = 1.0
    source: str = "baseline"  # 'baseline' (sqis spc baseline) | 'warmup'

    @classmethod
    def from_points(cls, points: list[tuple[int, int]], *, laney: bool = False, source: str = "baseline") -> Baseline:
        n = sum(p[0] for p in points)
        d = sum(p[1] for p in points)
        if n <= 0:
            raise ValueError("a baseline needs at least one inspection")
        p_bar = d / n
        sz = laney_sigma_z(points, p_bar) if laney else 1.0
        return cls(p_bar, n, d, sz, source)


def sigma(p_bar: float, n: int, sigma_z: float = 1.0) -> float:
    """Standard deviation of a subgroup's proportion: √(p̄(1−p̄)/n) (times Laney's σz)."""
    if n <= 0:
        return math.inf
    return math.sqrt(max(p_bar * (1 - p_bar), 0.0) / n) * sigma_z


def limits(p_bar: float, n: int, k: float = 3.0, sigma_z: float = 1.0) -> tuple[float, float]:
    """(LCL, UCL) of a subgroup of n: p̄ ± k·σ, LCL floored at 0 and UCL capped at 1."""
    s = sigma(p_bar, n, sigma_z)
    return max(0.0, p_bar - k * s), min(1.0, p_bar + k * s)


def laney_sigma_z(points: list[tuple[int, int]], p_bar: float) -> float:
    """Laney p′: σz = mean moving range of the z-scores / 1.128 (overdispersion between subgroups)."""
    zs = []
    for n, d in points:
        s = sigma(p_bar, n)
        if n > 0 and s > 0 and math.isfinite(s):
            zs.append((d / n - p_bar) / s)
    if len(zs) < 2:
        return 1.0
    mr = sum(abs(a - b) for a, b in zip(zs[1:], zs[:-1], strict=True)) / (len(zs) - 1)
    return max(1.0, mr / 1.128)


@dataclass(frozen=True)
class Point:
    """One p-chart point: a window's inspections (n), fails (d), and its z-score against the chart."""

    start_us: int
    n: int
    d: int
    z: float
    center: float
    lcl: float
    ucl: float

    @property
    def p(self) -> float:
        return self.d / self.n if self.n else 0.0


@dataclass(frozen=True)
class RunRule:
    """``k`` of the last ``m`` points beyond ``zone`` σ on the same side of the centre line.

    Western Electric: we1 = 1 of 1 beyond 3σ, we2 = 2 of 3 beyond 2σ, we3 = 4 of 5 beyond 1σ,
    we4 = 8 of 8 on one side (beyond 0σ). Custom rules are written ``K/M>Z`` (e.g. ``2/2>3``).
    """

    name: str
    k: int
    m: int
    zone: float

    def check(self, zs: list[float], side: Side) -> int:
        """+1 if it fires above, -1 below, 0 not; ``zs`` is the series' recent z-scores, newest last."""
        if len(zs) < self.m:
            return 0
        last = zs[-self.m:]
        if side in ("upper", "both") and zs[-1] > self.zone and sum(1 for z in last if z > self.zone) >= self.k:
            return 1
        if side in ("lower", "both") and zs[-1] < -self.zone and sum(1 for z in last if z < -self.zone) >= self.k:
            return -1
        return 0


WESTERN_ELECTRIC: dict[str, RunRule] = {
    "we1": RunRule("we1_beyond_3sigma", 1, 1, 3.0),
    "we2": RunRule("we2_2of3_beyond_2sigma", 2, 3, 2.0),
    "we3": RunRule("we3_4of5_beyond_1sigma", 4, 5, 1.0),
    "we4": RunRule("we4_8_in_a_row_one_side", 8, 8, 0.0),
}
_CUSTOM = re.compile(r"^(\d+)/(\d+)>(\d+(?:\.\d+)?)$")


def parse_rules(spec: str) -> list[RunRule]:
    """'we1,we2' or 'all' or custom 'K/M>Z' items -> rules; ValueError with a clear message."""
    out: list[RunRule] = []
    for item in (x.strip().lower() for x in spec.split(",")):
        if not item:
            continue
        if item == "all":
            out.extend(WESTERN_ELECTRIC.values())
        elif item in WESTERN_ELECTRIC:
            out.append(WESTERN_ELECTRIC[item])
        elif m := _CUSTOM.match(item):
            k, mm, z = int(m.group(1)), int(m.group(2)), float(m.group(3))
            if not 1 <= k <= mm <= 50:
                raise ValueError(f"rule {item!r}: need 1 <= K <= M <= 50")
            out.append(RunRule(f"run_{k}of{mm}_beyond_{m.group(3)}sigma", k, mm, z))
        else:
            raise ValueError(f"unknown SPC rule {item!r}: use we1..we4, all, or K/M>Z like 2/2>3")
    if not out:
        raise ValueError("no SPC rule selected")
    return out


@dataclass(frozen=True)
class Firing:
    """A rule that fired on a point, with the points that made it fire."""

    rule: str
    direction: int  # +1 above the centre line, -1 below
    point: Point
    points: tuple[Point, ...]


@dataclass
class PChart:
    """A p-chart of one series (a line, or a line x class) fed point by point.

    Before a baseline exists the chart is in warm-up: the first ``warmup_points`` points (with at
    least ``min_n`` inspections each) estimate p̄ and no rule fires; after that p̄ is frozen as a
    provisional baseline (source 'warmup') until `sqis spc baseline` stores one. Points with fewer
    than ``min_n`` inspections (a stopped line) are skipped, not plotted.
    """

    rules: list[RunRule]
    side: Side = "upper"
    baseline: Baseline | None = None
    warmup_points: int = 30
    min_n: int = 50
    laney: bool = False
    threshold: float | None = None  # plain rule: fires when the window's rate exceeds it
    history: deque[Point] = field(default_factory=lambda: deque(maxlen=50))
    _warmup: list[tuple[int, int]] = field(default_factory=list)

    @property
    def in_warmup(self) -> bool:
        return self.baseline is None

    def add(self, start_us: int, n: int, d: int) -> tuple[Point | None, list[Firing]]:
        if n < self.min_n:
            return None, []
        firings: list[Firing] = []
        if self.threshold is not None and d / n > self.threshold:
            pt = Point(start_us, n, d, math.nan, self.threshold, 0.0, self.threshold)
            firings.append(Firing("threshold", 1, pt, (pt,)))
        if self.baseline is None:
            self._warmup.append((n, d))
            if len(self._warmup) >= self.warmup_points:
                self.baseline = Baseline.from_points(self._warmup, laney=self.laney, source="warmup")
                self._warmup = []
            return None, firings
        b = self.baseline
        # a centre line of 0 (no defect in the baseline) would make any defect infinitely many σ:
        # the σ uses at least one defect in the baseline's inspections
        s = sigma(max(b.p_bar, 1.0 / max(1, b.frames)), n, b.sigma_z)
        z = (d / n - b.p_bar) / s if s > 0 else (math.inf if d / n > b.p_bar else 0.0)
        lcl, ucl = limits(b.p_bar, n, 3.0, b.sigma_z)
        pt = Point(start_us, n, d, z, b.p_bar, lcl, ucl)
        self.history.append(pt)
        zs = [p.z for p in self.history]
        for r in self.rules:
            direction = r.check(zs, self.side)
            if direction:
                firings.append(Firing(r.name, direction, pt, tuple(list(self.history)[-r.m:])))
        return pt, firings

    def in_control(self, pt: Point | None) -> bool:
        """A point inside ±2σ (and under the threshold): counts towards auto-resolve."""
        if pt is None:
            return False
        return abs(pt.z) < 2.0 and (self.threshold is None or pt.p <= self.threshold)
