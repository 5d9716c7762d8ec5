"""Models: champion (production) against challenger (shadow) per line, and every canary switch with its
evidence (tables shadow_agreement and model_switches, written by `sqis model shadow` / `sqis model canary`)."""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import Input, Output, callback, html

from dashboard import queries as q
from dashboard import state
from dashboard.components import empty, num, pct, table, when
from dashboard.model_queries import agreement, switches


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Models: champion against challenger"),
        html.Div(id="model-agreement"),
        html.H3("Canary switches"),
        html.Div(id="model-switches"),
    ])


dash.register_page(__name__, path="/models", name="Models", title="SQIS · Models", order=5, layout=layout)


def _ratio(n: Any, d: Any) -> float | None:
    return float(n) / float(d) if d else None


def render(f: q.Filters) -> tuple[list[Any], list[Any]]:
    """The agreement table and the switch log (the Models page's data callback)."""
    with state.db() as conn:
        rows, sw = agreement(conn, f), switches(conn)
    if rows:
        body = [[r["model_name"], f"v{r['champion_version']} / v{r['challenger_version']}", r["line_id"],
                 num(r["frames"]), pct(_ratio(r["agree"], r["frames"])),
                 f"{pct(_ratio(r['champion_fail'], r['frames']))} / {pct(_ratio(r['challenger_fail'], r['frames']))}",
                 "—" if not r["matched"] else f"{float(r['iou_sum']) / r['matched']:.2f}",
                 f"{num(r['champion_boxes'])} / {num(r['challenger_boxes'])}", when(r["updated_at"])] for r in rows]
        classes = ["state-open" if (_ratio(r["agree"], r["frames"]) or 1.0) < 0.9 else "" for r in rows]
        agree = [table(["model", "champion / challenger", "line", "frames", "verdict agreement",
                        "FAIL rate (champion / challenger)", "matched IoU", "boxes", "updated"], body, classes,
                       id_="agreement-table")]
    else:
        agree = [empty("No shadow pairs in this range (is a challenger alias set and SQIS_SHADOW_SHARE > 0?).")]
    if sw:
        def evidence(e: Any) -> str:
            e = e if isinstance(e, dict) else json.loads(e or "{}")
            c, s = e.get("canary", {}), e.get("shadow", {})
            return (f"canary {c.get('fail', '?')}/{c.get('frames', '?')} FAIL, p95 {c.get('p95_total_ms') or 0:.0f} ms;"
                    f" shadow agreement {pct(s.get('verdict_agreement'))} over {s.get('frames', 0)}")

        body = [[when(r["at"]), r["model_name"], f"v{r['from_version'] or '—'} → v{r['to_version']}", r["action"],
                 ", ".join(r["lines"] or []) or f"{pct(r['share'])} of cameras", r["reason"], evidence(r["evidence"])]
                for r in sw]
        log = [table(["at", "model", "versions", "action", "lines", "reason", "evidence"], body,
                     [f"switch-{r['action']}" for r in sw], id_="switch-table")]
    else:
        log = [empty("No canary yet.")]
    return agree, log


@callback(Output("model-agreement", "children"), Output("model-switches", "children"), Input("url", "search"),
          Input("tick", "n_intervals"))
def on_models(search: str | None, _: int | None) -> tuple[list[Any], list[Any]]:
    return render(q.Filters.from_query(search))
