"""Part verdicts: all camera views of one part (``part_id``) within a window become one verdict.

OK when every expected view passed, NG with the worst defect and the views it came from, INCOMPLETE
when the expected views did not all arrive in time (never a silent OK). faust has no stream joins;
this is the per-part state kept by hand: bounded (oldest parts decided INCOMPLETE first) and expired.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

US = 1_000_000


@dataclass
class _View:
    camera_id: str
    frame_id: str
    verdict: str
    worst_class: str | None
    worst_score: float | None


@dataclass
class _Part:
    part_id: str
    line_id: str
    first_seen_us: int
    deadline: float  # processing time (monotonic seconds) when it is decided INCOMPLETE
    views: dict[str, _View] = field(default_factory=dict)


@dataclass(frozen=True)
class PartVerdict:
    part_id: str
    line_id: str
    verdict: str  # OK | NG | INCOMPLETE
    expected_views: int
    views: tuple[dict[str, Any], ...]
    missing_cameras: tuple[str, ...]
    worst_class: str | None
    worst_score: float | None
    worst_camera: str | None
    first_seen_us: int
    decided_us: int
    reason: str = ""

    def to_avro(self) -> dict[str, Any]:
        return {
            "part_id": self.part_id, "line_id": self.line_id, "verdict": self.verdict,
            "expected_views": self.expected_views, "views": list(self.views),
            "missing_cameras": list(self.missing_cameras), "worst_class": self.worst_class,
            "worst_score": self.worst_score, "worst_camera": self.worst_camera,
            "first_seen_at": self.first_seen_us, "decided_at": self.decided_us, "reason": self.reason,
        }


@dataclass
class PartStats:
    decided: int = 0
    incomplete: int = 0
    evicted: int = 0
    late_views: int = 0
    duplicate_views: int = 0


class PartTracker:
    """Collects views per part_id; ``expected`` is a view count, or per line a set of camera ids."""

    def __init__(self, *, expected_views: int = 2, cameras_by_line: dict[str, set[str]] | None = None,
                 timeout_s: float = 10.0, max_parts: int = 100_000, remember_decided: int = 100_000) -> None:
        if expected_views < 1:
            raise ValueError("expected_views must be >= 1")
        self.expected_views = expected_views
        self.cameras_by_line = cameras_by_line or {}
        self.timeout_s = timeout_s
        self.max_parts = max_parts
        self.parts: OrderedDict[str, _Part] = OrderedDict()
        self.decided: OrderedDict[str, None] = OrderedDict()
        self.remember_decided = remember_decided
        self.stats = PartStats()

    def _expected(self, line: str) -> int:
        cams = self.cameras_by_line.get(line)
        return len(cams) if cams else self.expected_views

    def add(self, rec: dict[str, Any], now: float) -> list[PartVerdict]:
        pid = rec.get("part_id")
        if not pid:
            return []
        if pid in self.decided:
            self.stats.late_views += 1
            return []
        out: list[PartVerdict] = []
        p = self.parts.get(pid)
        if p is None:
            if len(self.parts) >= self.max_parts:
                _, oldest = self.parts.popitem(last=False)
                self.stats.evicted += 1
                out.append(self._decide(oldest, int(rec["captured_at"]), reason="evicted: too many open parts"))
            p = self.parts[pid] = _Part(pid, rec["line_id"], int(rec["captured_at"]), now + self.timeout_s)
        cam = rec["camera_id"]
        if cam in p.views:
            self.stats.duplicate_views += 1  # a redelivery or a re-inspection: the newest view wins
        worst = max(rec.get("detections") or (), key=lambda d: d["score"], default=None)
        p.views[cam] = _View(cam, rec["frame_id"], rec["verdict"], worst["class_name"] if worst else None,
                             float(worst["score"]) if worst else None)
        cams = self.cameras_by_line.get(p.line_id)
        complete = cams.issubset(p.views) if cams else len(p.views) >= self.expected_views
        if complete:
            del self.parts[pid]
            out.append(self._decide(p, max(p.first_seen_us, int(rec["captured_at"]))))
        return out

    def tick(self, now: float, event_now_us: int = 0) -> list[PartVerdict]:
        """Decide every part whose deadline passed as INCOMPLETE (expiry)."""
        out = []
        while self.parts:
            pid, p = next(iter(self.parts.items()))
            if p.deadline > now:
                break  # parts are in arrival order, so deadlines are increasing
            del self.parts[pid]
            out.append(self._decide(p, max(event_now_us, p.first_seen_us), reason=f"timeout after {self.timeout_s:g} s"))
        return out

    def _decide(self, p: _Part, decided_us: int, reason: str = "") -> PartVerdict:
        cams = self.cameras_by_line.get(p.line_id)
        expected = self._expected(p.line_id)
        missing = tuple(sorted(cams - set(p.views))) if cams else ()
        complete = (not missing) if cams else len(p.views) >= expected
        views = tuple({"camera_id": v.camera_id, "frame_id": v.frame_id, "verdict": v.verdict,
                       "worst_class": v.worst_class, "worst_score": v.worst_score}
                      for v in sorted(p.views.values(), key=lambda v: v.camera_id))
        fails = [v for v in p.views.values() if v.verdict == "FAIL"]
        worst = max(fails, key=lambda v: v.worst_score or 0.0, default=None)
        if fails:
            verdict = "NG"  # a defect seen by any view fails the part, even if views are missing
        elif complete:
            verdict = "OK"
        else:
            verdict = "INCOMPLETE"
            self.stats.incomplete += 1
        self.stats.decided += 1
        self.decided[p.part_id] = None
        while len(self.decided) > self.remember_decided:
            self.decided.popitem(last=False)
        if not complete and not reason:
            reason = "incomplete"
        return PartVerdict(p.part_id, p.line_id, verdict, expected, views, missing,
                           worst.worst_class if worst else None, worst.worst_score if worst else None,
                           worst.camera_id if worst else None, p.first_seen_us, decided_us, reason)
