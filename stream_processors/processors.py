"""The four stream processors as plain objects: Inspection dicts in, (topic, key, record) out.

The Kafka loop (stream_processors/app.py) and the benchmark (stream_processors/bench.py) drive the
same objects, so the rules measured by ``sqis bench alerts`` are the rules that run on the line.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from stream_processors.alerts import AlertKey, AlertManager
from stream_processors.drift import STATS, DriftMonitor, DriftPoint
from stream_processors.parts import PartTracker
from stream_processors.spc import Baseline, PChart, RunRule, Side, parse_rules
from stream_processors.windows import ALL, US, RateRecord, RateWindows

log = logging.getLogger(__name__)

Output = tuple[str, str, dict[str, Any]]  # (topic key in schemas.catalog, message key, record)


@dataclass(frozen=True)
class SpcConfig:
    """The alerting defaults, chosen with ``sqis bench alerts`` (docs/DESIGN.md, "Stream processors").

    1-minute p-chart points per line; rule ``2/2>3`` (two consecutive points above 3σ) keeps a
    4-line plant under 2 false alerts a week while a doubled defect rate fires in 2-3 minutes;
    we1..we4 are selectable (``--rules we1,we2``) but each alone alarms tens of times a week at
    10,080 points per series. Laney's σz keeps that budget when counts vary more than binomially
    (20 % extra spread: 1 false alert a week instead of 86). Cooldown 30 min after a resolve;
    resolve after 10 points in control.
    """

    window_s: int = 60
    grace_s: int = 30
    rules: str = "2/2>3"
    side: Side = "upper"
    warmup_points: int = 60
    min_n: int = 50
    laney: bool = True  # Laney p': limits widened by the overdispersion seen in the warm-up (σz >= 1)
    per_class: bool = False
    thresholds: dict[tuple[str, str], float] = field(default_factory=dict)  # (line, class or '') -> max rate
    cooldown_s: float = 1800
    resolve_after: int = 10

    def rule_list(self) -> list[RunRule]:
        return parse_rules(self.rules)


@dataclass(frozen=True)
class DriftConfig:
    """Defaults chosen with ``sqis bench alerts``: a reference from the first 60 minutes that keeps
    learning from quiet points over a week (``ref_horizon_s``; 0 freezes it after ``ref_points``, the
    old behaviour), shifts measured in units of max(σ_ref, 4 % of the reference level), CUSUM k=1,
    h=10 (shifts under 4 % are ignored); model confidence fires only when it falls."""

    window_s: int = 60
    min_n: int = 20
    ref_points: int = 60
    ref_horizon_s: float = 7 * 86_400
    k: float = 1.0
    h: float = 10.0
    rel_floor: float = 0.04
    stats: tuple[str, ...] = STATS
    cooldown_s: float = 1800
    resolve_after: int = 10


def _fmt_rate(p: float) -> str:
    return f"{100 * p:.2f} %"


class RatesProcessor:
    """Defect rates per line / camera / class: tumbling windows + sliding view -> ``defect_rates``."""

    name = "rates"

    def __init__(self, *, window_s: int = 60, grace_s: int = 30, sliding_windows: int = 15,
                 idle_close_s: float = 5.0, source_idle_s: float = 10.0) -> None:
        self.windows = RateWindows(window_s, grace_s, sliding_windows, idle_close_s=idle_close_s,
                                   source_idle_s=source_idle_s)

    @staticmethod
    def _out(recs: list[RateRecord]) -> list[Output]:
        return [("defect_rates", r.line_id, r.to_avro()) for r in recs]

    def handle(self, rec: dict[str, Any], now: float, source: Any = None) -> list[Output]:
        return self._out(self.windows.add(rec, now, source))

    def tick(self, now: float) -> list[Output]:
        return self._out(self.windows.tick(now))

    def flush(self) -> list[Output]:
        """Close every window now (tests, the benchmark). A stopping process does not call it: its open
        windows' offsets are not committed, so the next run rebuilds them in full."""
        return self._out(self.windows.flush())

    def hold_since_us(self) -> int | None:
        """Earliest event time still held in open state (offsets of later frames are not committed)."""
        return min(self.windows.open) if self.windows.open else None

    def metrics(self) -> dict[str, int]:
        w = self.windows
        return {"processed": w.processed, "late_frames": w.late_frames, "too_old": w.too_old,
                "state_keys": w.state_size()}


class SpcProcessor:
    """p-charts per line (and line x class) on closed windows -> ``alerts`` (kinds spc, threshold)."""

    name = "spc"

    def __init__(self, config: SpcConfig | None = None, *, baselines: dict[tuple[str, str], Baseline] | None = None,
                 idle_close_s: float = 5.0,
                 baseline_loader: Callable[[], dict[tuple[str, str], Baseline]] | None = None,
                 reload_s: float = 300.0) -> None:
        self.config = config or SpcConfig()
        self.baseline_loader = baseline_loader  # re-read every reload_s: a new `sqis spc baseline` applies live
        self.reload_s = reload_s
        self._loaded_at: float | None = None
        self.rules = self.config.rule_list()
        self.baselines = dict(baselines or {})
        self.windows = RateWindows(self.config.window_s, self.config.grace_s, 0, idle_close_s=idle_close_s)
        self.charts: dict[tuple[str, str], PChart] = {}
        self.alerts = AlertManager(cooldown_s=self.config.cooldown_s, resolve_after=self.config.resolve_after)
        self.points = 0

    def set_baseline(self, line: str, cls: str, b: Baseline) -> None:
        self.baselines[(line, cls)] = b
        if (line, cls) in self.charts:
            self.charts[(line, cls)].baseline = b

    def chart(self, line: str, cls: str) -> PChart:
        c = self.charts.get((line, cls))
        if c is None:
            cfg = self.config
            c = self.charts[(line, cls)] = PChart(
                self.rules, cfg.side, self.baselines.get((line, cls)), cfg.warmup_points, cfg.min_n, cfg.laney,
                cfg.thresholds.get((line, cls)))
        return c

    def handle(self, rec: dict[str, Any], now: float, source: Any = None) -> list[Output]:
        return self.on_windows(self.windows.add(rec, now, source))

    def tick(self, now: float) -> list[Output]:
        if self.baseline_loader is not None and (self._loaded_at is None or now - self._loaded_at >= self.reload_s):
            self._loaded_at = now
            try:
                for (line, cls), b in self.baseline_loader().items():
                    if self.baselines.get((line, cls)) != b:
                        log.info("SPC baseline loaded", extra={"line_id": line, "class_name": cls, "p_bar": b.p_bar})
                        self.set_baseline(line, cls, b)
            except Exception as exc:  # noqa: BLE001 - keep charting with the baselines we have
                log.warning("cannot reload SPC baselines", extra={"error": str(exc)})
        return self.on_windows(self.windows.tick(now))

    def flush(self) -> list[Output]:
        return self.on_windows(self.windows.flush())

    def hold_since_us(self) -> int | None:
        return min(self.windows.open) if self.windows.open else None

    def on_windows(self, recs: list[RateRecord]) -> list[Output]:
        out: list[Output] = []
        for r in recs:
            if r.final and r.window_s == self.config.window_s and r.camera_id == ALL and (
                    r.class_name == ALL or self.config.per_class):
                out.extend(self.on_window(r))
        return out

    def on_window(self, r: RateRecord) -> list[Output]:
        """One closed window of a line (or line x class) -> its chart point -> alert states."""
        chart = self.chart(r.line_id, r.class_name)
        pt, firings = chart.add(r.window_start_us, r.frames, r.fails)
        self.points += 1
        end = r.window_start_us + r.window_s * US
        out: list[Output] = []
        for f in firings:
            kind = "threshold" if f.rule == "threshold" else "spc"
            key: AlertKey = (kind, r.line_id, "", r.class_name)
            where = f"line {r.line_id}" + (f" class {r.class_name}" if r.class_name else "")
            if kind == "threshold":
                msg = f"{where}: defect rate {_fmt_rate(f.point.p)} above threshold {_fmt_rate(f.point.ucl)}"
            else:
                msg = (f"{where}: defect rate {_fmt_rate(f.point.p)} ({f.point.d}/{f.point.n}), rule {f.rule}, "
                       f"centre {_fmt_rate(f.point.center)}, UCL {_fmt_rate(f.point.ucl)}")
            details = {"points": [{"start": p.start_us, "n": p.n, "d": p.d,
                                   "z": round(p.z, 3) if math.isfinite(p.z) else None} for p in f.points],
                       "baseline": chart.baseline.source if chart.baseline else "none",
                       "direction": "above" if f.direction > 0 else "below"}
            for a in self.alerts.fire(key, rule=f.rule, window_start_us=r.window_start_us, window_end_us=end,
                                      value=f.point.p, center=f.point.center, lcl=f.point.lcl, ucl=f.point.ucl,
                                      message=msg, examples=r.examples, details=details):
                out.append(("alerts", a.alert_id, a.to_avro()))
        if not firings and chart.in_control(pt):
            for kind in ("spc", "threshold"):
                for a in self.alerts.in_control((kind, r.line_id, "", r.class_name), end):
                    out.append(("alerts", a.alert_id, a.to_avro()))
        return out

    def metrics(self) -> dict[str, int]:
        s = self.alerts.stats
        return {"processed": self.windows.processed, "points": self.points, "alerts_opened": s.opened,
                "alerts_resolved": s.resolved, "suppressed_cooldown": s.suppressed_cooldown,
                "late_frames": self.windows.late_frames, "too_old": self.windows.too_old}


class DriftProcessor:
    """Per-camera image-statistic CUSUMs -> ``alerts`` (kind drift)."""

    name = "drift"

    def __init__(self, config: DriftConfig | None = None, *, idle_close_s: float = 30.0) -> None:
        self.config = c = config or DriftConfig()
        self.monitor = DriftMonitor(window_s=c.window_s, min_n=c.min_n, ref_points=c.ref_points, k=c.k, h=c.h,
                                    rel_floor=c.rel_floor, horizon=int(c.ref_horizon_s // c.window_s),
                                    stats=c.stats, idle_close_s=idle_close_s)
        self.alerts = AlertManager(cooldown_s=c.cooldown_s, resolve_after=c.resolve_after)

    def handle(self, rec: dict[str, Any], now: float, source: Any = None) -> list[Output]:
        return self.on_points(self.monitor.add(rec, now))

    def tick(self, now: float) -> list[Output]:
        return self.on_points(self.monitor.close_idle(now))

    def flush(self) -> list[Output]:
        return self.on_points(self.monitor.flush())

    def hold_since_us(self) -> int | None:
        starts = [w.start_us for w in self.monitor.windows.values()]
        return min(starts) if starts else None

    def on_points(self, pts: list[DriftPoint]) -> list[Output]:
        out: list[Output] = []
        for p in pts:
            key: AlertKey = ("drift", p.line_id, p.camera_id, p.stat)
            end = p.window_start_us + p.window_s * US
            if p.direction:
                change = (p.value - p.reference) / p.reference * 100 if p.reference else 0.0
                msg = (f"camera {p.camera_id} (line {p.line_id}): {p.stat} drifted "
                       f"{'up' if p.direction > 0 else 'down'} to {p.value:.3g} from {p.reference:.3g} "
                       f"({change:+.1f} %)")
                details = {"stat": p.stat, "z": round(p.z, 2), "reference": p.reference, "scale": p.scale,
                           "n": p.n, "detector": "cusum", **{k: getattr(self.config, k) for k in ("k", "h", "rel_floor")}}
                for a in self.alerts.fire(key, rule=f"cusum_{p.stat}", window_start_us=p.window_start_us,
                                          window_end_us=end, value=p.value, center=p.reference, message=msg,
                                          details=details):
                    out.append(("alerts", a.alert_id, a.to_avro()))
            elif abs(p.z) < 1.0:
                for a in self.alerts.in_control(key, end):
                    out.append(("alerts", a.alert_id, a.to_avro()))
        return out

    def metrics(self) -> dict[str, int]:
        s = self.alerts.stats
        return {"alerts_opened": s.opened, "alerts_resolved": s.resolved, "late": self.monitor.late,
                "no_stats": self.monitor.no_stats, "detectors": len(self.monitor.detectors)}


class PartsProcessor:
    """Views of one part_id -> one verdict on ``part_verdicts``."""

    name = "parts"

    def __init__(self, *, expected_views: int = 2, cameras_by_line: dict[str, set[str]] | None = None,
                 timeout_s: float = 10.0, max_parts: int = 100_000) -> None:
        self.tracker = PartTracker(expected_views=expected_views, cameras_by_line=cameras_by_line,
                                   timeout_s=timeout_s, max_parts=max_parts)
        self._event_now = 0

    def handle(self, rec: dict[str, Any], now: float, source: Any = None) -> list[Output]:
        self._event_now = max(self._event_now, int(rec["captured_at"]))
        return [("part_verdicts", v.part_id, v.to_avro()) for v in self.tracker.add(rec, now)]

    def tick(self, now: float) -> list[Output]:
        return [("part_verdicts", v.part_id, v.to_avro()) for v in self.tracker.tick(now, self._event_now)]

    def flush(self) -> list[Output]:
        return []  # open parts stay open: a clean stop should not call them INCOMPLETE

    def hold_since_us(self) -> int | None:
        if not self.tracker.parts:
            return None
        return min(p.first_seen_us for p in self.tracker.parts.values())

    def metrics(self) -> dict[str, int]:
        s = self.tracker.stats
        return {"open_parts": len(self.tracker.parts), "decided": s.decided, "incomplete": s.incomplete,
                "evicted": s.evicted, "late_views": s.late_views}
