"""`sqis spc baseline`: a p-chart centre line from the inspections table, stored in spc_baselines."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from stream_processors.errors import BaselineError
from stream_processors.spc import Baseline

POINTS_SQL = """
SELECT date_bin(make_interval(secs => %(w)s), i.captured_at, TIMESTAMPTZ 'epoch') AS w,
       count(*) AS n,
       count(*) FILTER (WHERE {fail}) AS d
FROM inspections i
WHERE i.line_id = %(line)s AND i.captured_at >= %(since)s AND i.captured_at < %(until)s
GROUP BY 1 ORDER BY 1
"""
FAIL_ANY = "i.verdict = 'FAIL'"
FAIL_CLASS = ("i.verdict = 'FAIL' AND EXISTS (SELECT 1 FROM defects x WHERE x.frame_id = i.frame_id "
              "AND x.class_name = %(cls)s)")

UPSERT = """
INSERT INTO spc_baselines (line_id, class_name, p_bar, frames, fails, sigma_z, points, window_s, since, until, created_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (line_id, class_name) DO UPDATE SET
    p_bar = EXCLUDED.p_bar, frames = EXCLUDED.frames, fails = EXCLUDED.fails, sigma_z = EXCLUDED.sigma_z,
    points = EXCLUDED.points, window_s = EXCLUDED.window_s, since = EXCLUDED.since, until = EXCLUDED.until,
    created_at = now()
"""


def compute_baseline(conn: Any, line: str, since: datetime, until: datetime, *, class_name: str = "",
                     window_s: int = 60, min_points: int = 20, min_n: int = 50, laney: bool = True,
                     store: bool = True) -> tuple[Baseline, int]:
    """(baseline, points used); windows with fewer than ``min_n`` inspections are left out."""
    sql = POINTS_SQL.format(fail=FAIL_CLASS if class_name else FAIL_ANY)
    rows = conn.execute(sql, {"w": window_s, "line": line, "since": since, "until": until, "cls": class_name}).fetchall()
    points = [(int(n), int(d)) for _, n, d in rows if n >= min_n]
    if len(points) < min_points:
        raise BaselineError(f"line {line!r}{' class ' + repr(class_name) if class_name else ''}: "
                            f"{len(points)} windows of {window_s} s with >= {min_n} inspections between "
                            f"{since.isoformat()} and {until.isoformat()}; need {min_points}")
    b = Baseline.from_points(points, laney=laney)
    if store:
        with conn.transaction():
            conn.execute(UPSERT, (line, class_name, b.p_bar, b.frames, b.fails, b.sigma_z, len(points), window_s,
                                  since, until))
    return b, len(points)
