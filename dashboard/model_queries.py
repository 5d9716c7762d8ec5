"""Queries of the Models page (champion against challenger, canary switches): tables shadow_agreement and
model_switches (infra/migrations/007_shadow.sql)."""

from __future__ import annotations

from typing import Any

from dashboard import queries as q

AGREEMENT_SQL = """
SELECT model_name, champion_version, challenger_version, line_id, sum(frames) AS frames,
       sum(verdict_agree) AS agree, sum(champion_fail) AS champion_fail, sum(challenger_fail) AS challenger_fail,
       sum(iou_sum) AS iou_sum, sum(matched_boxes) AS matched, sum(champion_boxes) AS champion_boxes,
       sum(challenger_boxes) AS challenger_boxes, max(updated_at) AS updated_at
FROM shadow_agreement
WHERE window_end > %(since)s AND (%(line)s::text IS NULL OR line_id = %(line)s)
GROUP BY model_name, champion_version, challenger_version, line_id
ORDER BY max(updated_at) DESC, line_id
LIMIT 200
"""

SWITCHES_SQL = """
SELECT at, model_name, from_version, to_version, action, reason, lines, share, evidence
FROM model_switches ORDER BY at DESC LIMIT 50
"""


def agreement(conn: Any, f: q.Filters) -> list[dict[str, Any]]:
    since, _ = f.window()
    return q._rows(conn, AGREEMENT_SQL, {"since": since, "line": f.line})  # type: ignore[arg-type]


def switches(conn: Any) -> list[dict[str, Any]]:
    return q._rows(conn, SWITCHES_SQL)  # type: ignore[arg-type]


