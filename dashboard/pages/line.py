"""Line: the p-chart (centre line, 3-sigma limits per point, points that broke a rule marked with the
rule), and the defect rates per camera and per class."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dash
from dash import Input, Output, Patch, State, callback, ctx, dcc, html

from dashboard import queries as q
from dashboard import state
from dashboard.components import COLORS, GRAPH_CONFIG, base_layout, empty, link, pct


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Line"),
        html.Div(id="line-note", className="note"),
        dcc.Graph(id="pchart", config=GRAPH_CONFIG, className="panel"),
        dcc.Store(id="pchart-state"),
        html.Div([dcc.Graph(id="by-camera", config=GRAPH_CONFIG, className="panel half"),
                  dcc.Graph(id="by-class", config=GRAPH_CONFIG, className="panel half")], className="row"),
        html.Div(id="line-alerts"),
    ])


dash.register_page(__name__, path="/line", name="Line", title="SQIS · Line", order=1, layout=layout)


def _traces(pc: dict[str, Any]) -> list[dict[str, Any]]:
    pts, al = pc["points"], pc["alerts"]
    by_t = {p["t"]: p for p in pts}
    rule_pts = [(a, by_t[a["t"]]) for a in al if a["t"] in by_t]
    x = [p["t"] for p in pts]
    return [
        {"type": "scatter", "mode": "lines+markers", "name": "p (defect rate)", "x": x, "y": [p["p"] for p in pts],
         "line": {"color": COLORS["p"]}, "marker": {"size": 5},
         "customdata": [p["frames"] for p in pts], "hovertemplate": "%{x}<br>p=%{y:.2%} of %{customdata} frames"},
        {"type": "scatter", "mode": "lines", "name": "UCL", "x": x, "y": [p["ucl"] for p in pts],
         "line": {"color": COLORS["limit"], "dash": "dash", "shape": "hv", "width": 1}},
        {"type": "scatter", "mode": "lines", "name": "LCL", "x": x, "y": [p["lcl"] for p in pts],
         "line": {"color": COLORS["limit"], "dash": "dash", "shape": "hv", "width": 1}},
        {"type": "scatter", "mode": "lines", "name": f"centre p̄ ({pc['center_source']})",
         "x": [x[0], x[-1]] if x else [], "y": [pc["center"]] * (2 if x else 0),
         "line": {"color": COLORS["center"], "width": 1}},
        {"type": "scatter", "mode": "markers+text", "name": "rule broken", "x": [p["t"] for _, p in rule_pts],
         "y": [p["p"] for _, p in rule_pts], "text": [a["rule"] for a, _ in rule_pts], "textposition": "top center",
         "marker": {"color": COLORS["rule"], "size": 12, "symbol": "x"}},
    ]


def pchart_figure(f: q.Filters) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """The full p-chart (with no line chosen: the first line with rates in the range, and links to the
    others), the state the live appends continue from, and a note on the centre line."""
    with state.db() as conn:
        pc = q.pchart(conn, f)
    since, until = f.window()
    title = f"p-chart · {pc['line_id'] or 'no line'}" + (f" · {f.camera}" if f.camera else "") + (
        f" · {f.cls}" if f.cls and not f.camera else "")
    pts = pc["points"]
    layout = {**base_layout(title), "height": 380, "xaxis": {"type": "date", "range": [since, until]},
              "yaxis": {"tickformat": ".1%", "rangemode": "tozero"}}
    if not pts:  # no data: keep the time axis and a sane rate axis instead of plotly's -1..6 and 0..400 %
        layout["yaxis"] = {"tickformat": ".0%", "range": [0, 0.1]}
        layout["annotations"] = [{"text": "No rates in this range", "showarrow": False, "xref": "paper",
                                  "yref": "paper", "x": 0.5, "y": 0.5, "font": {"size": 14, "color": "#888"}}]
    fig = {"data": _traces(pc) if pts else [], "layout": layout}
    st = {"line": pc["line_id"], "n": len(pts), "last": pts[-1]["t"].isoformat() if pts else None,
          "center": pc["center"], "query": f.to_query()}
    if not pc["line_id"]:
        return fig, st, "No rates in this range yet."
    note: list[Any] = [f"Centre line p̄ = {pct(pc['center'], 2)} from the {pc['center_source']}; limits "
                       f"p̄ ± 3·√(p̄(1−p̄)/n) per {pc.get('bucket_s', q.RATE_WINDOW_S)} s point."]
    if f.line is None:
        others = [x for x in pc.get("lines", []) if x != pc["line_id"]]
        note += [html.Br(), f"No line chosen: showing {pc['line_id']}, the first with rates in this range"]
        if others:
            note.append("; the other lines: ")
            for i, x in enumerate(others):
                note += ([", "] if i else []) + [link(x, "/line", f.with_(line=x))]
        note.append(".")
    return fig, st, html.Span(note, className="line-choice") if f.line is None else note[0]


def pchart_patch(f: q.Filters, st: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """New points appended to the p, UCL and LCL traces (the last one re-read), centre line and rule
    markers refreshed; None when the chart must be drawn again (empty, or the line changed)."""
    if not st.get("last") or not st.get("line"):
        return None
    last = datetime.fromisoformat(st["last"])
    with state.db() as conn:
        pc = q.pchart(conn, f.with_(line=st["line"]))  # limits depend on the centre: re-read cheaply
    if pc["center"] != st["center"]:
        return None
    new = [p for p in pc["points"] if p["t"] >= last]
    patch, n = Patch(), st["n"]
    if new:
        if new[0]["t"] == last and n > 0:
            for i in (0, 1, 2):
                del patch["data"][i]["x"][n - 1]
                del patch["data"][i]["y"][n - 1]
            del patch["data"][0]["customdata"][n - 1]
            n -= 1
        for i, key in ((0, "p"), (1, "ucl"), (2, "lcl")):
            patch["data"][i]["x"].extend([p["t"] for p in new])
            patch["data"][i]["y"].extend([p[key] for p in new])
        patch["data"][0]["customdata"].extend([p["frames"] for p in new])
        st["n"], st["last"] = n + len(new), new[-1]["t"].isoformat()
    traces = _traces(pc)
    patch["data"][3] = traces[3]
    patch["data"][4] = traces[4]
    since, until = f.window()
    patch["layout"]["xaxis"]["range"] = [since, until]
    return patch, st


@callback(Output("pchart", "figure"), Output("pchart-state", "data"), Output("line-note", "children"),
          Input("url", "search"), Input("tick", "n_intervals"), State("pchart-state", "data"))
def on_pchart(search: str | None, _: int | None, st: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    f = q.Filters.from_query(search)
    if ctx.triggered_id == "tick" and st and st.get("query") == f.to_query():
        out = pchart_patch(f, st)
        if out is not None:
            return out[0], out[1], dash.no_update
    return pchart_figure(f)


def breakdown_figures(f: q.Filters) -> tuple[dict[str, Any], dict[str, Any], list[Any]]:
    """Per-camera and per-class defect rates over the range, and the range's SPC alerts."""
    with state.db() as conn:
        cams = q.rates_by(conn, f, "camera")
        classes = q.rates_by(conn, f, "class")
        al = q.alerts(conn, f, limit=20)

    def bars(rows: list[dict[str, Any]], title: str) -> dict[str, Any]:
        return {"data": [{"type": "bar", "x": [r["key"] for r in rows], "y": [r["p"] for r in rows],
                          "text": [f"{r['fails']}/{r['frames']}" for r in rows], "textposition": "auto",
                          "marker": {"color": COLORS["p"]}}],
                "layout": {**base_layout(title), "yaxis": {"tickformat": ".1%", "rangemode": "tozero"}}}

    alerts = [html.H3("Alerts in this range")] + ([
        html.Ul([html.Li([link(a["rule"], "/alerts", f, alert_id=a["alert_id"]),
                          f" · {a['state']} · {a['line_id']} {a['camera_id']} {a['class_name']} · {a['message']}"])
                 for a in al], className="alert-list")] if al else [empty("No alerts in this range.")])
    return bars(cams, "Defect rate per camera"), bars(classes, "Frames with the class, per class"), alerts


@callback(Output("by-camera", "figure"), Output("by-class", "figure"), Output("line-alerts", "children"),
          Input("url", "search"), Input("tick", "n_intervals"))
def on_breakdown(search: str | None, _: int | None) -> tuple[Any, Any, Any]:
    return breakdown_figures(q.Filters.from_query(search))
