"""Alerts: open / acknowledged / resolved, the rule and the values behind each one, and acknowledge
with a comment (stored in PostgreSQL). /alerts?alert_id=ID opens one alert (the notifiers' link)."""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import Input, Output, State, callback, dcc, html, no_update

from dashboard import queries as q
from dashboard import state
from dashboard.components import empty, link, pct, table, when

STATE_FILTERS = [{"label": "open", "value": "open"}, {"label": "acknowledged", "value": "acknowledged"},
                 {"label": "resolved", "value": "resolved"}, {"label": "all", "value": "all"}]


def layout(alert_id: str | None = None, **_: Any) -> html.Div:
    return html.Div([
        html.H2("Alerts"),
        html.Div([
            html.Div([dcc.RadioItems(id="alert-state", options=STATE_FILTERS, value="all" if alert_id else "open",
                                     inline=True, className="range"),
                      html.Div(id="alert-list")], className="alerts-col"),
            html.Div(id="alert-detail", className="detail"),
        ], className="defects"),
        dcc.Store(id="ack-done"),
    ])


dash.register_page(__name__, path="/alerts", name="Alerts", title="SQIS · Alerts", order=3, layout=layout)


def _value(a: dict[str, Any]) -> str:
    if a["kind"] == "spc" or (a["value"] is not None and 0 <= a["value"] <= 1):
        return pct(a["value"], 2)
    return "—" if a["value"] is None else f"{a['value']:.4g}"


def render_list(f: q.Filters, st: str | None, selected: str | None = None) -> list[Any]:
    """The alert table (the Alerts page's data callback)."""
    with state.db() as conn:
        rows = q.alerts(conn, f, state=None if st in (None, "all") else st)
    if not rows:
        return [empty("No alerts here.")]
    return [table(
        ["opened", "state", "severity", "rule", "line / camera / class", "value", ""],
        [[when(a["opened_at"]), a["state"], a["severity"], a["rule"],
          " / ".join(x for x in (a["line_id"], a["camera_id"], a["class_name"]) if x), _value(a),
          link("details", "/alerts", f, alert_id=a["alert_id"])] for a in rows],
        row_classes=[f"state-{a['state']}" + (" selected" if a["alert_id"] == selected else "") for a in rows],
        id_="alert-table")]


@callback(Output("alert-list", "children"), Input("url", "search"), Input("tick", "n_intervals"),
          Input("alert-state", "value"), Input("ack-done", "data"))
def on_list(search: str | None, _: int | None, st: str | None, __: Any) -> list[Any]:
    return render_list(q.Filters.from_query(search), st, q.query_param(search, "alert_id"))


def render_detail(alert_id: str | None, f: q.Filters) -> list[Any]:
    if not alert_id:
        return [empty("Pick an alert to see the rule and the values behind it.")]
    with state.db() as conn:
        a = q.alert(conn, alert_id)
    if a is None:
        return [empty("No such alert.")]
    facts = table(["", ""], [
        ["alert", a["alert_id"]], ["state", a["state"]], ["kind · rule", f"{a['kind']} · {a['rule']}"],
        ["severity", a["severity"]], ["where", " / ".join(x for x in (a["line_id"], a["camera_id"], a["class_name"]) if x)],
        ["window", f"{when(a['window_start'])} → {when(a['window_end'])}"],
        ["value", _value(a)], ["centre", pct(a["center"], 2)], ["limits", f"{pct(a['lcl'], 2)} … {pct(a['ucl'], 2)}"],
        ["opened", when(a["opened_at"])], ["resolved", when(a["resolved_at"])],
    ], id_="alert-facts")
    examples = [link(str(fid)[:8], "/defects", f, frame=str(fid)) for fid in (a["example_frame_ids"] or [])]
    ack: list[Any]
    if a["state"] == "open":
        ack = [html.Label("Comment"),
               dcc.Textarea(id="ack-comment", placeholder="what was done, who was told", maxLength=q.MAX_COMMENT_LEN,
                            className="comment"),
               html.Button("Acknowledge", id="ack-button", className="btn bad"), html.Span(id="ack-msg")]
    else:
        ack = [html.P(f"Acknowledged by {a['acknowledged_by'] or '—'} at {when(a['acknowledged_at'])}", id="ack-by"),
               html.Blockquote(a["ack_comment"] or "", id="ack-comment-text", className="comment-text"),
               # the ack controls exist on every detail so the callback below always has its inputs
               html.Div([dcc.Textarea(id="ack-comment"), html.Button(id="ack-button"), html.Span(id="ack-msg")],
                        hidden=True)]
    return [
        html.H3(a["message"] or a["rule"], id="alert-title"), facts,
        html.H4("Why it fired"), html.Pre(json.dumps(a["details"], indent=1, default=str), className="details"),
        html.Div([html.H4("Example frames"), *[html.Span([e, " "]) for e in examples]]) if examples else html.Div(),
        html.Div(ack, className="ack"),
    ]


@callback(Output("alert-detail", "children"), Input("url", "search"), Input("ack-done", "data"))
def on_detail(search: str | None, _: Any) -> list[Any]:
    return render_detail(q.query_param(search, "alert_id"), q.Filters.from_query(search))


@callback(Output("ack-done", "data"), Output("ack-msg", "children"), Input("ack-button", "n_clicks"),
          State("ack-comment", "value"), State("url", "search"), State("who", "value"), prevent_initial_call=True)
def on_ack(n: int | None, comment: str | None, search: str | None, who: str | None) -> tuple[Any, Any]:
    from dashboard.app import current_user

    alert_id = q.query_param(search, "alert_id")
    if not n or not alert_id:
        return no_update, no_update
    with state.db() as conn:
        ok = q.acknowledge(conn, alert_id, current_user(who), comment or "")
    return ({"alert_id": alert_id, "n": n}, "") if ok else (no_update, "Not open any more (reload).")
