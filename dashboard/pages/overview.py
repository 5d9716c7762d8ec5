"""Overview: per line frames, PASS/FAIL, defect rate and its change, throughput, latency, model,
workers up, open alerts; the defect rate of every line over the range, appended live."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import dash
from dash import Input, Output, Patch, State, callback, ctx, dcc, html

from dashboard import queries as q
from dashboard import state
from dashboard.components import GRAPH_CONFIG, base_layout, empty, kpi, link, ms, num, pct, when


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Overview"),
        html.Div(id="ov-lines", className="lines"),
        dcc.Graph(id="ov-rates", config=GRAPH_CONFIG, className="panel"),
        dcc.Store(id="ov-rates-state"),
    ])


dash.register_page(__name__, path="/", name="Overview", title="SQIS · Overview", order=0, layout=layout)


def render_lines(f: q.Filters) -> list[Any]:
    """The KPI block of every line (the data callback timed by `sqis bench dashboard`)."""
    with state.db() as conn:
        rows = q.overview(conn, f)
    if not rows:
        return [empty("No inspections in this range yet.")]
    out = []
    for r in rows:
        ch = r["rate_change"]
        trend = "—" if ch is None else f"{'▲' if ch > 0 else '▼' if ch < 0 else '='} {100 * abs(ch):.1f} pts vs previous"
        tone = "bad" if ch is not None and ch > 0.005 else "good" if ch is not None and ch < -0.005 else ""
        lf = f.with_(line=r["line_id"])
        out.append(html.Section([
            html.H3(link(r["line_id"], "/line", lf)),
            html.Div([
                kpi("Frames", num(r["frames"]), f"now {num(r['throughput_per_min'], 1)} / min", id_=f"kpi-frames-{r['line_id']}"),
                kpi("PASS / FAIL", f"{num(r['passes'])} / {num(r['fails'])}"),
                kpi("Defect rate", pct(r["defect_rate"]), trend, tone),
                kpi("Latency p50 / p95", f"{ms(r['p50_ms'])} / {ms(r['p95_ms'])}", "end to end, last 5 min"),
                kpi("Model", r["model"] or "—", f"last frame {when(r['last_frame_at'])}"),
                kpi("Workers up", str(r["workers_up"]), "seen in the last minute",
                    "bad" if r["workers_up"] == 0 else ""),
                kpi("Open alerts", str(r["open_alerts"]), None, "bad" if r["open_alerts"] else "",),
                kpi("Dead letters", str(r["dead_letters"]), "frames refused in the period (sqis dlq show)",
                    "bad" if r["dead_letters"] else ""),
            ], className="kpis"),
        ], className="line-card"))
    return out


@callback(Output("ov-lines", "children"), Input("url", "search"), Input("tick", "n_intervals"))
def on_lines(search: str | None, _: int | None) -> list[Any]:
    return render_lines(q.Filters.from_query(search))


def rates_figure(f: q.Filters) -> tuple[dict[str, Any], dict[str, Any]]:
    """The full defect-rate figure and the state the live appends continue from."""
    with state.db() as conn:
        rows = q.rate_series(conn, f)
    by_line: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_line.setdefault(r["line_id"], []).append(r)
    since, until = f.window()
    fig = {"data": [{"type": "scatter", "mode": "lines+markers", "name": lid, "x": [p["t"] for p in pts],
                     "y": [p["p"] for p in pts], "marker": {"size": 4}} for lid, pts in by_line.items()],
           "layout": {**base_layout("Defect rate per line"), "xaxis": {"range": [since, until]},
                      "yaxis": {"tickformat": ".1%", "rangemode": "tozero"}}}
    st = {"lines": {lid: {"i": i, "n": len(pts), "last": pts[-1]["t"].isoformat()}
                    for i, (lid, pts) in enumerate(by_line.items())}, "query": f.to_query()}
    return fig, st


def rates_patch(f: q.Filters, st: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """Append the new points (and re-read the last, possibly still filling, one) as a Patch; None
    when a full figure is needed (a new line appeared)."""
    lines = st.get("lines") or {}
    if not lines:
        return None
    after = min(datetime.fromisoformat(v["last"]) for v in lines.values())
    with state.db() as conn:
        rows = q.rate_series(conn, f, after=after)
    patch = Patch()
    for lid in {r["line_id"] for r in rows}:
        if lid not in lines:
            return None
    for lid, tr in lines.items():
        last = datetime.fromisoformat(tr["last"])
        new = [r for r in rows if r["line_id"] == lid and r["t"] >= last]
        if not new:
            continue
        i, n = tr["i"], tr["n"]
        if new[0]["t"] == last and n > 0:
            del patch["data"][i]["x"][n - 1]
            del patch["data"][i]["y"][n - 1]
            n -= 1
        patch["data"][i]["x"].extend([r["t"] for r in new])
        patch["data"][i]["y"].extend([r["p"] for r in new])
        tr["n"], tr["last"] = n + len(new), new[-1]["t"].isoformat()
    since, until = f.window()
    patch["layout"]["xaxis"]["range"] = [since, until]
    return patch, st


@callback(Output("ov-rates", "figure"), Output("ov-rates-state", "data"),
          Input("url", "search"), Input("tick", "n_intervals"), State("ov-rates-state", "data"))
def on_rates(search: str | None, _: int | None, st: dict[str, Any] | None) -> tuple[Any, Any]:
    f = q.Filters.from_query(search)
    if ctx.triggered_id == "tick" and st and st.get("query") == f.to_query():
        out = rates_patch(f, st)
        if out is not None:
            return out
    return rates_figure(f)
