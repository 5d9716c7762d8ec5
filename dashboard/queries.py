"""Every read and write the dashboard makes, as plain functions over a psycopg connection.

Counts come from the stream processors' pre-aggregated ``defect_rates``; ``inspections`` is read only
for "latest N" lists and short recent windows, through indexes. Every value is a bound parameter;
the only SQL text composed at run time is a choice among fixed fragments (so each filter combination
gets a plan that uses its index, instead of one generic ``$1 IS NULL OR col = $1`` plan).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, LiteralString
from urllib.parse import parse_qs, urlencode

from psycopg import Connection
from psycopg.rows import dict_row

log = logging.getLogger(__name__)

RANGES: dict[str, int] = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}
DEFAULT_RANGE = "1h"
RATE_WINDOW_S = 60  # the stream processors' 1-minute tumbling windows
MAX_POINTS = 360  # a chart over a long range is re-bucketed to about this many points
HOURLY_ABOVE_S = 86400  # ranges longer than this read the hourly roll-up
RECENT_S = 300  # latency and workers-up are measured over the last 5 minutes
WORKER_UP_S = 60
REVIEW_DECISIONS = ("confirmed", "false_reject", "missed_defect")  # missed_defect: a PASS frame with a defect
ALERT_STATES = ("open", "acknowledged", "resolved")
PART_VERDICTS = ("OK", "NG", "INCOMPLETE")
MAX_FILTER_LEN = 200
MAX_COMMENT_LEN = 2000


class DashboardError(RuntimeError):
    """A request the dashboard cannot serve (bad id, unknown alert)."""


# ---- filters (kept in the URL) ---------------------------------------------------------------


@dataclass(frozen=True)
class Filters:
    """What every page is filtered by: line, camera, class and a time range ending now.

    Rates exist per line, per camera and per class (not per camera and class together): with both a
    camera and a class set, rate panels follow the camera; lists (gallery, alerts) apply both."""

    line: str | None = None
    camera: str | None = None
    cls: str | None = None
    range: str = DEFAULT_RANGE

    @property
    def range_s(self) -> int:
        return RANGES[self.range]

    def window(self, now: datetime | None = None) -> tuple[datetime, datetime]:
        until = now or datetime.now(UTC)
        return until - timedelta(seconds=self.range_s), until

    def to_query(self) -> str:
        """The URL query string (``?line=..&range=..``) of these filters; '' when all are defaults."""
        q = {k: v for k, v in (("line", self.line), ("camera", self.camera), ("class", self.cls)) if v}
        if self.range != DEFAULT_RANGE:
            q["range"] = self.range
        return "?" + urlencode(q) if q else ""

    @classmethod
    def from_query(cls, search: str | None) -> Filters:
        """Filters from a URL query string; unknown ranges fall back to the default, values are kept
        as given (bounded in length): they are only ever bound as parameters and shown escaped."""
        qs = parse_qs((search or "").lstrip("?"), keep_blank_values=False)

        def one(key: str) -> str | None:
            v = (qs.get(key) or [None])[0]
            return v[:MAX_FILTER_LEN] if v else None

        rng = one("range") or DEFAULT_RANGE
        return cls(line=one("line"), camera=one("camera"), cls=one("class"),
                   range=rng if rng in RANGES else DEFAULT_RANGE)

    def with_(self, **kw: Any) -> Filters:
        return replace(self, **kw)


def query_param(search: str | None, key: str) -> str | None:
    v = (parse_qs((search or "").lstrip("?")).get(key) or [None])[0]
    return v[:MAX_FILTER_LEN] if v else None


def _rows(conn: Connection[Any], sql: LiteralString, params: dict[str, Any] | tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    with conn.cursor(row_factory=dict_row) as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _rate_scope(f: Filters) -> tuple[LiteralString, dict[str, Any]]:
    """Which rows of defect_rates answer these filters: camera rows, class rows or whole-line rows."""
    if f.camera:
        return "camera_id = %(camera)s AND class_name = ''", {"camera": f.camera}
    if f.cls:
        return "camera_id = '' AND class_name = %(cls)s", {"cls": f.cls}
    return "camera_id = '' AND class_name = ''", {}


def _line_clause(f: Filters) -> tuple[LiteralString, dict[str, Any]]:
    return ("line_id = %(line)s", {"line": f.line}) if f.line else ("TRUE", {})


def _ratio(n: float | None, d: float | None) -> float | None:
    return (n or 0) / d if d else None


@dataclass(frozen=True)
class _Rates:
    """Where a range's counts come from: the 1-minute windows, or their hourly roll-up (migration 003)
    for ranges longer than a day."""

    table: LiteralString
    t: LiteralString  # the time column
    window: LiteralString  # extra condition on the rows
    step_s: int


_MINUTE = _Rates("defect_rates", "window_start", "window_s = %(w)s", RATE_WINDOW_S)
_HOURLY = _Rates("defect_rates_hourly", "hour_start", "TRUE", 3600)


def set_rate_window(seconds: int) -> None:
    """The stream processors' tumbling window the pages read: 60 s in production (the hourly roll-up
    follows those rows); `sqis demo` runs 10 s windows so that its alerts fire within minutes."""
    global RATE_WINDOW_S, _MINUTE
    RATE_WINDOW_S = int(seconds)
    _MINUTE = _Rates("defect_rates", "window_start", "window_s = %(w)s", RATE_WINDOW_S)


def _rates(f: Filters) -> _Rates:
    return _HOURLY if f.range_s > HOURLY_ABOVE_S else _MINUTE


def _floor(t: datetime, step_s: int) -> datetime:
    epoch = datetime(2000, 1, 1, tzinfo=UTC)
    return epoch + timedelta(seconds=((t - epoch).total_seconds() // step_s) * step_s)


# ---- filter options ----------------------------------------------------------------------------


def filter_options(conn: Connection[Any], since_s: int = 86400) -> dict[str, list[str]]:
    """Lines, cameras and classes seen in the rate tables over the last day (for the dropdowns)."""
    rows = _rows(
        conn,
        "SELECT DISTINCT line_id, camera_id, class_name FROM defect_rates_hourly "
        "WHERE hour_start >= now() - make_interval(secs => %(s)s)",
        {"s": since_s + 3600},
    )
    return {
        "lines": sorted({r["line_id"] for r in rows}),
        "cameras": sorted({r["camera_id"] for r in rows if r["camera_id"]}),
        "classes": sorted({r["class_name"] for r in rows if r["class_name"]}),
    }


# ---- overview ----------------------------------------------------------------------------------


def overview(conn: Connection[Any], f: Filters, now: datetime | None = None) -> list[dict[str, Any]]:
    """Per line: frames, PASS/FAIL, defect rate and its change against the previous period of the
    same length; throughput (frames/min) and end-to-end p50/p95 latency over the last 5 minutes; the
    model serving it, workers up, open alerts and frames dead-lettered in the period (table
    dead_letters, written from frames.dlq by the stream-tables sink)."""
    since, until = f.window(now)
    scope, p1 = _rate_scope(f)
    line, p2 = _line_clause(f)
    src = _rates(f)
    since = _floor(since, src.step_s)
    params = {"since": since, "prev": since - timedelta(seconds=f.range_s), "until": until,
              "w": RATE_WINDOW_S, **p1, **p2}
    rates = _rows(
        conn,
        "SELECT line_id,"
        " sum(frames) FILTER (WHERE " + src.t + " >= %(since)s) AS frames,"
        " sum(fails) FILTER (WHERE " + src.t + " >= %(since)s) AS fails,"
        " sum(frames) FILTER (WHERE " + src.t + " < %(since)s) AS prev_frames,"
        " sum(fails) FILTER (WHERE " + src.t + " < %(since)s) AS prev_fails,"
        " max(" + src.t + ") AS last_window"
        " FROM " + src.table + " WHERE " + scope + " AND " + line + " AND " + src.window +
        " AND " + src.t + " >= %(prev)s AND " + src.t + " < %(until)s"
        " GROUP BY line_id ORDER BY line_id",
        params,
    )
    lines = [r["line_id"] for r in rates]
    if not lines:
        return []
    recent = _rows(
        conn,
        "SELECT line_id,"
        " percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM inspected_at - captured_at) * 1000) AS p50,"
        " percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM inspected_at - captured_at) * 1000) AS p95,"
        " count(DISTINCT worker_id) FILTER (WHERE captured_at >= %(up)s) AS workers, count(*) AS recent_frames"
        " FROM inspections WHERE line_id = ANY(%(lines)s) AND captured_at >= %(recent)s AND captured_at <= %(until)s"
        " GROUP BY line_id",
        {"lines": lines, "recent": until - timedelta(seconds=RECENT_S),
         "up": until - timedelta(seconds=WORKER_UP_S), "until": until},
    )
    models = _rows(
        conn,
        "SELECT l.line_id, i.model_name, i.model_version, i.captured_at AS last_frame_at"
        " FROM unnest(%(lines)s::text[]) AS l(line_id) CROSS JOIN LATERAL ("
        "  SELECT model_name, model_version, captured_at FROM inspections"
        "  WHERE inspections.line_id = l.line_id ORDER BY captured_at DESC LIMIT 1) i",
        {"lines": lines},
    )
    open_alerts = _rows(
        conn,
        "SELECT line_id, count(*) AS n FROM alerts WHERE state = 'open' AND line_id = ANY(%(lines)s) GROUP BY line_id",
        {"lines": lines},
    )
    dead = _rows(
        conn,
        "SELECT line_id, count(*) AS n FROM dead_letters"
        " WHERE line_id = ANY(%(lines)s) AND failed_at >= %(since)s AND failed_at < %(until)s GROUP BY line_id",
        {"lines": lines, "since": since, "until": until},
    )
    by_dead = {r["line_id"]: r["n"] for r in dead}
    by_recent = {r["line_id"]: r for r in recent}
    by_model = {r["line_id"]: r for r in models}
    by_alerts = {r["line_id"]: r["n"] for r in open_alerts}
    out = []
    for r in rates:
        lid = r["line_id"]
        frames, fails = int(r["frames"] or 0), int(r["fails"] or 0)
        rate, prev = _ratio(fails, frames), _ratio(r["prev_fails"], r["prev_frames"])
        rec, mod = by_recent.get(lid, {}), by_model.get(lid, {})
        out.append({
            "line_id": lid, "frames": frames, "fails": fails, "passes": frames - fails,
            "defect_rate": rate, "prev_defect_rate": prev,
            "rate_change": (rate - prev) if rate is not None and prev is not None else None,
            "throughput_per_min": int(rec.get("recent_frames") or 0) / (RECENT_S / 60.0),
            "p50_ms": rec.get("p50"), "p95_ms": rec.get("p95"), "workers_up": int(rec.get("workers") or 0),
            "model": f"{mod['model_name']} {mod['model_version']}" if mod else None,
            "last_frame_at": mod.get("last_frame_at"), "last_window": r["last_window"],
            "open_alerts": int(by_alerts.get(lid, 0)), "dead_letters": int(by_dead.get(lid, 0)),
        })
    return out


# ---- rate series and the p-chart ---------------------------------------------------------------


def bucket_seconds(range_s: int) -> int:
    """The chart's point width: the source's step, widened so a range has at most MAX_POINTS points."""
    step = _HOURLY.step_s if range_s > HOURLY_ABOVE_S else RATE_WINDOW_S
    return max(step, math.ceil(range_s / MAX_POINTS / step) * step)


def rate_series(conn: Connection[Any], f: Filters, after: datetime | None = None,
                now: datetime | None = None) -> list[dict[str, Any]]:
    """Defect rate per line and time bucket: [{line_id, t, frames, fails, p}] in time order.
    ``after``: only buckets starting at or after it (the live refresh re-reads the last one)."""
    since, until = f.window(now)
    src = _rates(f)
    b = bucket_seconds(f.range_s)
    since = _floor(since, b)
    if after is not None and after > since:
        since = after
    scope, p1 = _rate_scope(f)
    line, p2 = _line_clause(f)
    rows = _rows(
        conn,
        "SELECT line_id, date_bin(make_interval(secs => %(b)s), " + src.t + ", TIMESTAMPTZ '2000-01-01 00:00:00+00') AS t,"
        " sum(frames) AS frames, sum(fails) AS fails"
        " FROM " + src.table + " WHERE " + scope + " AND " + line + " AND " + src.window +
        " AND " + src.t + " >= %(since)s AND " + src.t + " < %(until)s"
        " GROUP BY 1, 2 ORDER BY 2, 1",
        {"b": b, "w": RATE_WINDOW_S, "since": since, "until": until, **p1, **p2},
    )
    for r in rows:
        r["frames"], r["fails"] = int(r["frames"]), int(r["fails"])
        r["p"] = _ratio(r["fails"], r["frames"])
    return rows


def p_limits(p_bar: float, n: int) -> tuple[float, float]:
    """p-chart limits for a subgroup of n: p̄ ± 3·√(p̄(1−p̄)/n), clipped to [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    s = 3.0 * math.sqrt(max(p_bar * (1.0 - p_bar), 0.0) / n)
    return (max(0.0, p_bar - s), min(1.0, p_bar + s))


def baseline(conn: Connection[Any], line_id: str, cls: str | None = None) -> dict[str, Any] | None:
    rows = _rows(conn, "SELECT line_id, class_name, p_bar, frames, fails, since, until FROM spc_baselines "
                       "WHERE line_id = %(l)s AND class_name = %(c)s", {"l": line_id, "c": cls or ""})
    return rows[0] if rows else None


def lines_with_rates(conn: Connection[Any], f: Filters, now: datetime | None = None) -> list[str]:
    """Lines with rates in the filter's range, read from the table the charts and the Overview read
    (the dropdowns' hourly roll-up lags the last hour behind)."""
    since, until = f.window(now)
    src = _rates(f)
    scope, p1 = _rate_scope(f)
    rows = _rows(conn, "SELECT DISTINCT line_id FROM " + src.table + " WHERE " + scope + " AND " + src.window +
                 " AND " + src.t + " >= %(since)s AND " + src.t + " < %(until)s ORDER BY 1",
                 {"w": RATE_WINDOW_S, "since": _floor(since, src.step_s), "until": until, **p1})
    return [r["line_id"] for r in rows]


def pchart(conn: Connection[Any], f: Filters, after: datetime | None = None,
           now: datetime | None = None) -> dict[str, Any]:
    """The p-chart of one line (the filter's line, else the first line with rates in the range):
    points with their limits, the centre line and where it came from, the SPC alerts that fired on
    these points, and (no line chosen) every line with rates in the range."""
    line_id = f.line
    lines: list[str] = []
    if line_id is None:
        lines = lines_with_rates(conn, f, now)
        if not lines:
            return {"line_id": None, "points": [], "alerts": [], "center": None, "center_source": None,
                    "lines": []}
        line_id = lines[0]
    lf = f.with_(line=line_id)
    pts = rate_series(conn, lf, after=after, now=now)
    base = baseline(conn, line_id, f.cls if not f.camera else None)
    if base is not None:
        center, source = float(base["p_bar"]), "baseline"
    else:
        n, d = sum(p["frames"] for p in pts), sum(p["fails"] for p in pts)
        center, source = (d / n if n else 0.0), "shown range (no baseline yet)"
    for p in pts:
        p["lcl"], p["ucl"] = p_limits(center, p["frames"])
    since, until = lf.window(now)
    alerts = _rows(
        conn,
        "SELECT alert_id, rule, state, window_start, window_end, value, message FROM alerts"
        " WHERE line_id = %(l)s AND kind = 'spc' AND opened_at >= %(since)s AND opened_at < %(until)s + interval '1 hour'"
        " AND window_start >= %(since)s ORDER BY window_start",
        {"l": line_id, "since": after or since, "until": until},
    )
    b = bucket_seconds(f.range_s)
    for a in alerts:  # the point the rule fired on, in the chart's buckets
        a["t"] = _floor(a["window_start"], b)
    return {"line_id": line_id, "points": pts, "alerts": alerts, "center": center, "center_source": source,
            "bucket_s": b, "lines": lines}


def rates_by(conn: Connection[Any], f: Filters, by: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Defect rate per camera (by='camera') or per class (by='class') over the range."""
    since, until = f.window(now)
    line, p = _line_clause(f)
    src = _rates(f)
    if by == "camera":
        sql: LiteralString = "SELECT camera_id AS key, sum(frames) AS frames, sum(fails) AS fails FROM "
        where: LiteralString = " WHERE camera_id <> '' AND class_name = '' AND "
    elif by == "class":
        sql = "SELECT class_name AS key, sum(frames) AS frames, sum(fails) AS fails FROM "
        where = " WHERE camera_id = '' AND class_name <> '' AND "
    else:
        raise ValueError(f"rates_by: by={by!r}")
    rows = _rows(conn, sql + src.table + where + line + " AND " + src.window + " AND " + src.t + " >= %(since)s"
                 " AND " + src.t + " < %(until)s GROUP BY 1 ORDER BY 1",
                 {"w": RATE_WINDOW_S, "since": _floor(since, src.step_s), "until": until, **p})
    for r in rows:
        r["frames"], r["fails"] = int(r["frames"]), int(r["fails"])
        r["p"] = _ratio(r["fails"], r["frames"])
    return rows


# ---- defects: gallery, detail, reviews ---------------------------------------------------------


def parse_frame_id(value: str | None) -> uuid.UUID:
    try:
        return uuid.UUID(str(value))
    except (ValueError, TypeError):
        raise DashboardError(f"not a frame id: {str(value)[:60]!r}") from None


def _line_camera(f: Filters, where: list[LiteralString], params: dict[str, Any]) -> None:
    """The Filters' line and camera as conditions on ``inspections i``."""
    if f.line:
        where.append("i.line_id = %(line)s")
        params["line"] = f.line
    if f.camera:
        where.append("i.camera_id = %(camera)s")
        params["camera"] = f.camera


def latest_fails(conn: Connection[Any], f: Filters, limit: int = 24, review: str | None = None,
                 now: datetime | None = None) -> list[dict[str, Any]]:
    """The latest FAIL frames (newest first) with their defects' classes/scores and any review.
    review: None (all), 'unreviewed', 'confirmed' or 'false_reject'."""
    since, until = f.window(now)
    where: list[LiteralString] = ["i.verdict = 'FAIL'", "i.captured_at >= %(since)s", "i.captured_at <= %(until)s"]
    params: dict[str, Any] = {"since": since, "until": until, "n": limit}
    _line_camera(f, where, params)
    if f.cls:
        where.append("EXISTS (SELECT 1 FROM defects d WHERE d.frame_id = i.frame_id AND d.class_name = %(cls)s)")
        params["cls"] = f.cls
    if review == "unreviewed":
        where.append("r.frame_id IS NULL")
    elif review in REVIEW_DECISIONS:
        where.append("r.decision = %(review)s")
        params["review"] = review
    sql: LiteralString = (
        "SELECT i.frame_id, i.line_id, i.camera_id, i.part_id, i.captured_at, i.model_name, i.model_version,"
        " i.n_defects, r.decision, (SELECT coalesce(json_agg(json_build_object('class_name', d.class_name,"
        " 'score', d.score) ORDER BY d.score DESC), '[]'::json) FROM defects d WHERE d.frame_id = i.frame_id) AS defects"
        " FROM inspections i LEFT JOIN inspection_reviews r ON r.frame_id = i.frame_id WHERE "
    )
    return _rows(conn, sql + " AND ".join(where) + " ORDER BY i.captured_at DESC LIMIT %(n)s", params)


def inspection(conn: Connection[Any], frame_id: str | uuid.UUID) -> dict[str, Any] | None:
    """The full inspection record with its defects and review, or None."""
    fid = parse_frame_id(str(frame_id))
    rows = _rows(conn, "SELECT i.*, r.decision, r.reviewer, r.comment AS review_comment, r.reviewed_at"
                       " FROM inspections i LEFT JOIN inspection_reviews r ON r.frame_id = i.frame_id"
                       " WHERE i.frame_id = %(f)s", {"f": fid})
    if not rows:
        return None
    rec = rows[0]
    rec["defects"] = _rows(conn, "SELECT idx, class_id, class_name, score, x1, y1, x2, y2, mask_rle, mask_area"
                                 " FROM defects WHERE frame_id = %(f)s ORDER BY idx", {"f": fid})
    queued = _rows(conn, "SELECT reasons, source, score, margin, candidates, queued_by, queued_at FROM review_queue"
                         " WHERE frame_id = %(f)s", {"f": fid})
    rec["queued"] = queued[0] if queued else None
    return rec


def review_queue(conn: Connection[Any], f: Filters, limit: int = 24) -> list[dict[str, Any]]:
    """Frames queued for review (active learning and operators' picks) and not reviewed yet, oldest first,
    with why (reasons), who queued them (source) and the verdict. Not bounded by the time range: a queue
    is worked through, whatever its age."""
    where: list[LiteralString] = ["r.frame_id IS NULL"]
    params: dict[str, Any] = {"n": limit}
    _line_camera(f, where, params)
    sql: LiteralString = (
        "SELECT i.frame_id, i.line_id, i.camera_id, i.captured_at, i.verdict, i.n_defects, rq.reasons, rq.source,"
        " rq.score, rq.queued_at, jsonb_array_length(rq.candidates) AS n_candidates"
        " FROM review_queue rq JOIN inspections i ON i.frame_id = rq.frame_id"
        " LEFT JOIN inspection_reviews r ON r.frame_id = rq.frame_id WHERE "
    )
    return _rows(conn, sql + " AND ".join(where) + " ORDER BY rq.queued_at, rq.frame_id LIMIT %(n)s", params)


def queue_for_review(conn: Connection[Any], frame_id: str | uuid.UUID, who: str, comment: str = "") -> None:
    """An operator's own pick: queue the frame for review (source 'operator'; no rate or cap applies)."""
    from infra.review_queue import queue_by_operator

    fid = parse_frame_id(str(frame_id))
    if not queue_by_operator(conn, fid, who[:MAX_FILTER_LEN], comment[:MAX_COMMENT_LEN]):
        raise DashboardError(f"no inspection {fid}")


def image_uri(conn: Connection[Any], frame_id: str | uuid.UUID) -> str | None:
    rows = _rows(conn, "SELECT image_uri FROM inspections WHERE frame_id = %(f)s", {"f": parse_frame_id(str(frame_id))})
    return rows[0]["image_uri"] if rows else None


def set_review(conn: Connection[Any], frame_id: str | uuid.UUID, decision: str, reviewer: str,
               comment: str = "") -> None:
    """Record a person's decision on a frame (the latest decision replaces an earlier one)."""
    if decision not in REVIEW_DECISIONS:
        raise DashboardError(f"decision must be one of {REVIEW_DECISIONS}, not {decision!r}")
    fid = parse_frame_id(str(frame_id))
    with conn.transaction():
        n = conn.execute(
            "INSERT INTO inspection_reviews (frame_id, decision, reviewer, comment) "
            "SELECT frame_id, %(d)s, %(who)s, %(c)s FROM inspections WHERE frame_id = %(f)s "
            "ON CONFLICT (frame_id) DO UPDATE SET decision = EXCLUDED.decision, reviewer = EXCLUDED.reviewer,"
            " comment = EXCLUDED.comment, reviewed_at = now()",
            {"f": fid, "d": decision, "who": reviewer[:MAX_FILTER_LEN], "c": comment[:MAX_COMMENT_LEN]},
        ).rowcount
    if n != 1:
        raise DashboardError(f"no inspection {fid}")
    log.info("frame reviewed", extra={"frame_id": str(fid), "decision": decision, "reviewer": reviewer})


# ---- alerts ------------------------------------------------------------------------------------


def alerts(conn: Connection[Any], f: Filters, state: str | None = None, limit: int = 100,
           now: datetime | None = None) -> list[dict[str, Any]]:
    """Alerts opened in the range, plus every still-open one, newest first."""
    since, until = f.window(now)
    where: list[LiteralString] = ["(opened_at >= %(since)s OR state = 'open')", "opened_at <= %(until)s"]
    params: dict[str, Any] = {"since": since, "until": until, "n": limit}
    if f.line:
        where.append("line_id = %(line)s")
        params["line"] = f.line
    if f.camera:
        where.append("camera_id = %(camera)s")
        params["camera"] = f.camera
    if f.cls:
        where.append("class_name = %(cls)s")
        params["cls"] = f.cls
    if state:
        if state not in ALERT_STATES:
            raise DashboardError(f"state must be one of {ALERT_STATES}")
        where.append("state = %(state)s")
        params["state"] = state
    sql: LiteralString = (
        "SELECT alert_id, kind, rule, severity, state, line_id, camera_id, class_name, window_start, window_end,"
        " value, center, lcl, ucl, message, opened_at, acknowledged_at, acknowledged_by, ack_comment, resolved_at"
        " FROM alerts WHERE "
    )
    return _rows(conn, sql + " AND ".join(where) + " ORDER BY opened_at DESC LIMIT %(n)s", params)


def alert(conn: Connection[Any], alert_id: str) -> dict[str, Any] | None:
    rows = _rows(conn, "SELECT * FROM alerts WHERE alert_id = %(a)s", {"a": alert_id[:MAX_FILTER_LEN]})
    return rows[0] if rows else None


def acknowledge(conn: Connection[Any], alert_id: str, user: str, comment: str) -> bool:
    """Acknowledge an open alert with a comment; False when it is not open (already acknowledged,
    resolved or unknown). The comment is stored as typed and only ever shown escaped."""
    with conn.transaction():
        n = conn.execute(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at = now(), acknowledged_by = %(u)s,"
            " ack_comment = %(c)s, updated_at = now() WHERE alert_id = %(a)s AND state = 'open'",
            {"a": alert_id[:MAX_FILTER_LEN], "u": user[:MAX_FILTER_LEN], "c": comment[:MAX_COMMENT_LEN]},
        ).rowcount
    if n:
        log.info("alert acknowledged", extra={"alert_id": alert_id, "user": user})
    return n == 1


# ---- parts -------------------------------------------------------------------------------------


def parts(conn: Connection[Any], f: Filters, verdict: str | None = None, limit: int = 100,
          now: datetime | None = None) -> list[dict[str, Any]]:
    """Part verdicts decided in the range, newest first."""
    since, until = f.window(now)
    where: list[LiteralString] = ["decided_at >= %(since)s", "decided_at <= %(until)s"]
    params: dict[str, Any] = {"since": since, "until": until, "n": limit}
    if f.line:
        where.append("line_id = %(line)s")
        params["line"] = f.line
    if verdict:
        if verdict not in PART_VERDICTS:
            raise DashboardError(f"verdict must be one of {PART_VERDICTS}")
        where.append("verdict = %(v)s")
        params["v"] = verdict
    sql: LiteralString = ("SELECT part_id, line_id, verdict, expected_views, views, missing_cameras, worst_class,"
                          " worst_score, first_seen_at, decided_at FROM part_verdicts WHERE ")
    return _rows(conn, sql + " AND ".join(where) + " ORDER BY decided_at DESC LIMIT %(n)s", params)


def part_counts(conn: Connection[Any], f: Filters, now: datetime | None = None) -> dict[str, int]:
    since, until = f.window(now)
    line, p = _line_clause(f)
    rows = _rows(conn, "SELECT verdict, count(*) AS n FROM part_verdicts WHERE " + line +
                 " AND decided_at >= %(since)s AND decided_at <= %(until)s GROUP BY verdict",
                 {"since": since, "until": until, **p})
    out = dict.fromkeys(PART_VERDICTS, 0)
    out.update({r["verdict"]: int(r["n"]) for r in rows})
    return out
