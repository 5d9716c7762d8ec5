"""Reads from PostgreSQL for the GET endpoints (tables of infra/migrations), as JSON-ready dicts."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any

from api.errors import ApiError

_DUR = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd])\s*$")
MAX_WINDOW_S = 7 * 86400


def parse_window(value: str) -> float:
    """'90s', '15m', '1h', '7d' -> seconds (at most 7 days); ApiError 422 otherwise."""
    m = _DUR.match(value or "")
    if not m:
        raise ApiError(422, "invalid-field", f"window {value[:40]!r}: expected a duration such as 15m, 1h, 1d")
    secs = float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    if not 0 < secs <= MAX_WINDOW_S:
        raise ApiError(422, "invalid-field", "window must be more than 0 s and at most 7d")
    return secs


def _iso(v: Any) -> Any:
    return v.isoformat() if isinstance(v, datetime) else v


def _row(cols: tuple[str, ...], row: tuple[Any, ...]) -> dict[str, Any]:
    return {c: _iso(v) for c, v in zip(cols, row, strict=True)}


_INSP = ("frame_id", "line_id", "camera_id", "seq", "part_id", "captured_at", "inspected_at", "image_uri", "width",
         "height", "model_name", "model_version", "verdict", "n_defects", "thresholds", "timings", "total_ms",
         "worker_id", "mask_uri", "segmenter", "verdict_rules")
_DEF = ("class_id", "class_name", "score", "x1", "y1", "x2", "y2", "mask_area", "area_mm2", "length_mm")


def inspection(conn: Any, frame_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT frame_id::text, {', '.join(_INSP[1:])} FROM inspections WHERE frame_id = %s",
                       (frame_id,)).fetchone()
    if row is None:
        return None
    out = _row(_INSP, row)
    out["verdict_rules"] = list(out["verdict_rules"] or [])
    out["source"] = "api" if str(out["worker_id"] or "").startswith("api:") else "line"
    dets = conn.execute(f"SELECT {', '.join(_DEF)} FROM defects WHERE frame_id = %s ORDER BY idx", (frame_id,)).fetchall()
    out["detections"] = [_row(_DEF, d) for d in dets]
    return out


_PART = ("part_id", "line_id", "verdict", "expected_views", "views", "missing_cameras", "worst_class", "worst_score",
         "worst_camera", "reason", "first_seen_at", "decided_at", "updated_at")


def part(conn: Any, part_id: str) -> dict[str, Any] | None:
    row = conn.execute(f"SELECT {', '.join(_PART)} FROM part_verdicts WHERE part_id = %s", (part_id,)).fetchone()
    if row is None:
        return None
    out = _row(_PART, row)
    out["missing_cameras"] = list(out["missing_cameras"] or [])
    return out


_RATE = ("window_start", "window_s", "frames", "fails", "defects", "late", "p95_latency_ms")


def rates(conn: Any, line_id: str, window_s: float, bucket_s: int) -> dict[str, Any]:
    rows = conn.execute(
        f"SELECT {', '.join(_RATE)} FROM defect_rates WHERE line_id = %s AND camera_id = '' AND class_name = '' "
        "AND window_s = %s AND window_start >= now() - make_interval(secs => %s) ORDER BY window_start",
        (line_id, bucket_s, window_s)).fetchall()
    windows = [_row(_RATE, r) for r in rows]
    for w in windows:
        w["rate"] = round(w["fails"] / w["frames"], 6) if w["frames"] else 0.0
    frames = sum(w["frames"] for w in windows)
    fails = sum(w["fails"] for w in windows)
    return {"line_id": line_id, "window_s": window_s, "bucket_s": bucket_s, "frames": frames, "fails": fails,
            "rate": round(fails / frames, 6) if frames else 0.0, "windows": windows}


_ALERT = ("alert_id", "kind", "rule", "severity", "state", "line_id", "camera_id", "class_name", "window_start",
          "window_end", "value", "center", "lcl", "ucl", "message", "example_frame_ids", "opened_at", "updated_at",
          "acknowledged_at", "resolved_at", "fired")


def alerts(conn: Any, state: str | None, line_id: str | None, limit: int) -> list[dict[str, Any]]:
    where, params = [], []
    if state:
        where.append("state = %s")
        params.append(state)
    if line_id:
        where.append("line_id = %s")
        params.append(line_id)
    sql = f"SELECT {', '.join(_ALERT)} FROM alerts"
    if where:
        sql += " WHERE " + " AND ".join(where)
    rows = conn.execute(sql + " ORDER BY opened_at DESC LIMIT %s", (*params, limit)).fetchall()
    out = [_row(_ALERT, r) for r in rows]
    for a in out:
        a["example_frame_ids"] = list(a["example_frame_ids"] or [])
    return out
