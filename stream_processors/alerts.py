"""Alert lifecycle shared by SPC, threshold and drift rules: open -> acknowledged -> resolved.

One open alert per series key (kind, line, camera, class): a rule firing again while it is open
updates it (de-duplication), a series back in control for ``resolve_after`` points resolves it, and a
new alert on the same key is suppressed for ``cooldown_s`` (event time) after a resolve. Alert ids
are derived from the key and the window that opened it, so a replay of the same input yields the
same ids (the table and the notifiers de-duplicate on them).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from typing import Any

US = 1_000_000

AlertKey = tuple[str, str, str, str]  # (kind, line_id, camera_id, class_name)


@dataclass(frozen=True)
class Alert:
    """One state of an alert: the payload of topic ``alerts`` (every change is a new message)."""

    alert_id: str
    kind: str  # 'spc' | 'threshold' | 'drift'
    rule: str
    state: str  # 'open' | 'acknowledged' | 'resolved'
    line_id: str
    camera_id: str
    class_name: str
    window_start_us: int
    window_end_us: int
    value: float
    center: float | None
    lcl: float | None
    ucl: float | None
    message: str
    opened_at_us: int
    updated_at_us: int
    resolved_at_us: int | None = None
    severity: str = "warning"
    fired: int = 1  # how many times a rule fired while it was open (de-duplicated)
    example_frame_ids: tuple[str, ...] = ()
    details: dict[str, Any] = field(default_factory=dict)

    def to_avro(self) -> dict[str, Any]:
        import json

        return {
            "alert_id": self.alert_id, "kind": self.kind, "rule": self.rule, "state": self.state,
            "severity": self.severity, "line_id": self.line_id, "camera_id": self.camera_id,
            "class_name": self.class_name, "window_start": self.window_start_us,
            "window_end": self.window_end_us, "value": float(self.value), "center": self.center,
            "lcl": self.lcl, "ucl": self.ucl, "message": self.message, "opened_at": self.opened_at_us,
            "updated_at": self.updated_at_us, "resolved_at": self.resolved_at_us, "fired": self.fired,
            "example_frame_ids": list(self.example_frame_ids),
            "details_json": json.dumps(self.details, sort_keys=True, default=str),
        }


def alert_id(key: AlertKey, rule: str, opened_window_us: int) -> str:
    raw = "|".join((*key, rule, str(opened_window_us)))
    return "a-" + hashlib.sha1(raw.encode()).hexdigest()[:16]


@dataclass
class _Series:
    open: Alert | None = None
    good_points: int = 0
    cooldown_until_us: int = 0


@dataclass
class AlertStats:
    opened: int = 0
    updated: int = 0
    resolved: int = 0
    suppressed_cooldown: int = 0
    deduplicated: int = 0


class AlertManager:
    """Keeps each series' alert state; every method returns the alert states to publish."""

    def __init__(self, *, cooldown_s: float = 1800, resolve_after: int = 10, max_series: int = 10_000) -> None:
        self.cooldown_us = int(cooldown_s * US)
        self.resolve_after = max(1, resolve_after)
        self.max_series = max_series
        self.series: dict[AlertKey, _Series] = {}
        self.stats = AlertStats()

    def _get(self, key: AlertKey) -> _Series:
        s = self.series.get(key)
        if s is None:
            if len(self.series) >= self.max_series:  # bounded: forget a quiet series first
                quiet = next((k for k, v in self.series.items() if v.open is None), None)
                if quiet is not None:
                    del self.series[quiet]
            s = self.series[key] = _Series()
        return s

    def fire(self, key: AlertKey, *, rule: str, window_start_us: int, window_end_us: int, value: float,
             center: float | None = None, lcl: float | None = None, ucl: float | None = None,
             message: str = "", examples: tuple[str, ...] = (), details: dict[str, Any] | None = None,
             severity: str = "warning") -> list[Alert]:
        s = self._get(key)
        s.good_points = 0
        now = window_end_us
        if s.open is not None:
            self.stats.deduplicated += 1
            merged = tuple(dict.fromkeys((*s.open.example_frame_ids, *examples)))[:10]
            s.open = replace(s.open, fired=s.open.fired + 1, updated_at_us=now, value=value,
                             window_end_us=window_end_us, example_frame_ids=merged)
            self.stats.updated += 1
            return [s.open]
        if now < s.cooldown_until_us:
            self.stats.suppressed_cooldown += 1
            return []
        kind, line, cam, cls = key
        if kind == "drift":
            cls = ""  # a drift key's last element is the statistic, named in the rule
        a = Alert(alert_id(key, rule, window_start_us), kind, rule, "open", line, cam, cls, window_start_us,
                  window_end_us, value, center, lcl, ucl, message, now, now, None, severity, 1,
                  tuple(examples)[:10], dict(details or {}))
        s.open = a
        self.stats.opened += 1
        return [a]

    def in_control(self, key: AlertKey, at_us: int) -> list[Alert]:
        """The series was in control at ``at_us``; resolves its open alert after enough such points."""
        s = self.series.get(key)
        if s is None or s.open is None:
            return []
        s.good_points += 1
        if s.good_points < self.resolve_after:
            return []
        a = replace(s.open, state="resolved", resolved_at_us=at_us, updated_at_us=at_us)
        s.open = None
        s.good_points = 0
        s.cooldown_until_us = at_us + self.cooldown_us
        self.stats.resolved += 1
        return [a]

    def acknowledge(self, alert_id_: str, at_us: int) -> list[Alert]:
        for s in self.series.values():
            if s.open is not None and s.open.alert_id == alert_id_:
                s.open = replace(s.open, state="acknowledged", updated_at_us=at_us)
                return [s.open]
        return []

    def open_alerts(self) -> list[Alert]:
        return [s.open for s in self.series.values() if s.open is not None]
