"""Parts: one verdict per part over its camera views; INCOMPLETE parts (a view never arrived) stand out."""

from __future__ import annotations

from typing import Any

import dash
from dash import Input, Output, callback, dcc, html

from dashboard import queries as q
from dashboard import state
from dashboard.components import empty, kpi, link, num, table, when

VERDICT_FILTERS = [{"label": "all", "value": "all"}] + [{"label": v, "value": v} for v in q.PART_VERDICTS]


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Parts"),
        html.Div(id="part-counts", className="kpis"),
        dcc.RadioItems(id="part-verdict", options=VERDICT_FILTERS, value="all", inline=True, className="range"),
        html.Div(id="part-list"),
    ])


dash.register_page(__name__, path="/parts", name="Parts", title="SQIS · Parts", order=4, layout=layout)


def render_parts(f: q.Filters, verdict: str | None) -> tuple[list[Any], list[Any]]:
    """Verdict counts and the parts table (the Parts page's data callback)."""
    with state.db() as conn:
        counts = q.part_counts(conn, f)
        rows = q.parts(conn, f, verdict=None if verdict in (None, "all") else verdict)
    total = sum(counts.values())
    kpis = [kpi("Parts", num(total)), kpi("OK", num(counts["OK"]), None, "good"),
            kpi("NG", num(counts["NG"]), None, "bad" if counts["NG"] else ""),
            kpi("INCOMPLETE", num(counts["INCOMPLETE"]), "a camera view never arrived",
                "warn" if counts["INCOMPLETE"] else "")]
    if not rows:
        return kpis, [empty("No parts decided in this range.")]

    def views(p: dict[str, Any]) -> list[Any]:
        out: list[Any] = []
        for v in p["views"] or []:
            label = f"{v.get('camera_id', '?')}:{v.get('verdict', '?')}"
            fid = v.get("frame_id")
            out += [link(label, "/defects", f, frame=str(fid)) if fid else label, " "]
        return out

    body = [[p["part_id"], p["line_id"], p["verdict"], views(p),
             ", ".join(p["missing_cameras"] or []) or "—",
             f"{p['worst_class']} {p['worst_score']:.2f}" if p["worst_class"] else "—", when(p["decided_at"])]
            for p in rows]
    classes = [f"verdict-{p['verdict'].lower()}" for p in rows]
    return kpis, [table(["part", "line", "verdict", "views", "missing", "worst", "decided"], body, classes,
                        id_="part-table")]


@callback(Output("part-counts", "children"), Output("part-list", "children"), Input("url", "search"),
          Input("tick", "n_intervals"), Input("part-verdict", "value"))
def on_parts(search: str | None, _: int | None, verdict: str | None) -> tuple[list[Any], list[Any]]:
    return render_parts(q.Filters.from_query(search), verdict)
