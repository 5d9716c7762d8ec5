"""Defects: a gallery of the latest FAIL frames with their overlay, a detail view with the whole
inspection record (why it failed), and the review (confirmed defect / false reject / missed defect).

The "review queue" filter lists the frames queued for review (active learning: uncertain, seg_disagree,
challenger_disagree; operators' own picks), PASS frames included, oldest first; a frame's detail shows why
it was queued and its candidate boxes, and "Queue for review" adds an operator's pick."""

from __future__ import annotations

import json
from typing import Any

import dash
from dash import ALL, Input, Output, State, callback, ctx, dcc, html, no_update

from dashboard import queries as q
from dashboard import state
from dashboard.components import empty, link, ms, table, when

REVIEW_FILTERS = [{"label": "all", "value": "all"}, {"label": "not reviewed", "value": "unreviewed"},
                  {"label": "confirmed", "value": "confirmed"}, {"label": "false reject", "value": "false_reject"},
                  {"label": "review queue", "value": "queue"}]
DECISION_TEXT = {"confirmed": "confirmed defect", "false_reject": "false reject", "missed_defect": "missed defect"}
REASON_TEXT = {"uncertain": "near threshold", "seg_disagree": "no mask", "challenger_disagree": "challenger disagrees",
               "operator": "operator's pick"}


def layout(**_: Any) -> html.Div:
    return html.Div([
        html.H2("Defects"),
        html.Div([html.Div([
            dcc.RadioItems(id="review-filter", options=REVIEW_FILTERS, value="all", inline=True, className="range"),
            html.Div(id="gallery", className="gallery")], className="gallery-col"),
            html.Div(id="detail", className="detail")], className="defects"),
        dcc.Store(id="review-done"),
    ])


dash.register_page(__name__, path="/defects", name="Defects", title="SQIS · Defects", order=2, layout=layout)


def render_gallery(f: q.Filters, review: str | None = None) -> list[Any]:
    """Cards of the latest FAIL frames (the gallery's data callback)."""
    svc = state.services()
    if review == "queue":
        return render_queue(f, svc.dash_settings.gallery_size)
    with state.db() as conn:
        rows = q.latest_fails(conn, f, limit=svc.dash_settings.gallery_size,
                              review=None if review in (None, "all") else review)
    if not rows:
        return [empty("No FAIL frames in this range.")]
    cards = []
    for r in rows:
        fid = str(r["frame_id"])
        classes = ", ".join(f"{d['class_name']} {d['score']:.2f}" for d in r["defects"][:3])
        badge = [html.Span(DECISION_TEXT[r["decision"]], className=f"badge {r['decision']}")] if r["decision"] else []
        cards.append(dcc.Link(html.Figure([
            html.Img(src=f"/frames/{fid}/overlay.jpg", alt=f"frame {fid}", className="thumb"),
            html.Figcaption([html.B(f"{r['line_id']} · {r['camera_id']}"), html.Br(), classes or "—",
                             html.Br(), html.Small(when(r["captured_at"])), *badge]),
        ], className="card"), href=link("", "/defects", f, frame=fid).href, className="card-link"))
    return cards


def render_queue(f: q.Filters, limit: int) -> list[Any]:
    """Cards of the frames queued for review and not reviewed yet, oldest first."""
    with state.db() as conn:
        rows = q.review_queue(conn, f, limit=limit)
    if not rows:
        return [empty("Nothing waiting for review.")]
    cards = []
    for r in rows:
        fid = str(r["frame_id"])
        why = ", ".join(REASON_TEXT.get(x, x) for x in r["reasons"])
        score = f" · top {r['score']:.2f}" if r["score"] is not None else ""
        cards.append(dcc.Link(html.Figure([
            html.Img(src=f"/frames/{fid}/overlay.jpg", alt=f"frame {fid}", className="thumb"),
            html.Figcaption([html.B(f"{r['line_id']} · {r['camera_id']}"), html.Br(), f"{r['verdict']}{score}",
                             html.Br(), html.Small(f"{why} ({r['source']})", className="queue-reason"), html.Br(),
                             html.Small(f"queued {when(r['queued_at'])}")]),
        ], className="card"), href=link("", "/defects", f, frame=fid).href, className="card-link"))
    return cards


@callback(Output("gallery", "children"), Input("url", "search"), Input("tick", "n_intervals"),
          Input("review-filter", "value"), Input("review-done", "data"))
def on_gallery(search: str | None, _: int | None, review: str | None, __: Any) -> list[Any]:
    return render_gallery(q.Filters.from_query(search), review)


def render_detail(frame_id: str | None, f: q.Filters) -> list[Any]:
    """The full record of one frame: image with overlay, defects, thresholds, timings, review."""
    if not frame_id:
        return [empty("Pick a frame on the left to see why it failed.")]
    try:
        with state.db() as conn:
            rec = q.inspection(conn, frame_id)
    except q.DashboardError as exc:
        return [empty(str(exc))]
    if rec is None:
        return [empty("No such inspection.")]
    fid = str(rec["frame_id"])
    th = rec["thresholds"] or {}
    per_class = th.get("per_class") or {}
    defects = table(["#", "class", "score", "threshold", "box (x1, y1, x2, y2)", "mask px"], [
        [d["idx"], d["class_name"], f"{d['score']:.3f}", f"{per_class.get(d['class_name'], th.get('default_score', '—'))}",
         f"{d['x1']:.0f}, {d['y1']:.0f}, {d['x2']:.0f}, {d['y2']:.0f}", d["mask_area"] if d["mask_area"] is not None else "—"]
        for d in rec["defects"]], id_="detail-defects")
    timings = rec["timings"] or {}
    facts = table(["", ""], [
        ["frame", fid], ["verdict", rec["verdict"]], ["line · camera", f"{rec['line_id']} · {rec['camera_id']}"],
        ["part", rec["part_id"] or "—"], ["captured", when(rec["captured_at"])], ["inspected", when(rec["inspected_at"])],
        ["model", f"{rec['model_name']} {rec['model_version']}"], ["worker", rec["worker_id"] or "—"],
        ["thresholds", f"score ≥ {th.get('default_score', '—')}, IoU {th.get('iou', '—')}"
         + (f", per class {json.dumps(per_class)}" if per_class else "")],
        ["timings", ", ".join(f"{k} {ms(v)}" for k, v in timings.items()) or "—"],
        ["image", f"{rec['width']}×{rec['height']} · {rec['image_uri']}"],
    ], id_="detail-facts")
    queued = rec.get("queued")
    queue_info: list[Any] = []
    if queued:
        queue_info.append(html.P(
            f"Queued for review ({queued['source']}, {when(queued['queued_at'])}): "
            + ", ".join(REASON_TEXT.get(x, x) for x in queued["reasons"])
            + (f"; top score {queued['score']:.3f}" if queued["score"] is not None else "")
            + (f", {queued['margin']:+.3f} from its threshold" if queued["margin"] is not None else ""),
            id="queue-status"))
        if queued["candidates"]:
            queue_info.append(table(["class", "score", "box (x1, y1, x2, y2)"], [
                [c.get("class_name", "?"), f"{float(c.get('score', 0)):.3f}",
                 f"{float(c['x1']):.0f}, {float(c['y1']):.0f}, {float(c['x2']):.0f}, {float(c['y2']):.0f}"]
                for c in queued["candidates"]], id_="detail-candidates"))
    review = (f"Reviewed: {DECISION_TEXT[rec['decision']]} by {rec['reviewer']} at {when(rec['reviewed_at'])}"
              + (f" — {rec['review_comment']}" if rec["review_comment"] else "")) if rec["decision"] else "Not reviewed yet."
    return [
        html.H3(["Frame ", html.Code(fid[:8]), " ", link("open image", f"/frames/{fid}.jpg", q.Filters())]),
        html.Img(src=f"/frames/{fid}/overlay.jpg", id="detail-image", className="detail-image",
                 alt=f"frame {fid} with its defects drawn"),
        defects, *queue_info, facts,
        html.Div([
            html.P(review, id="review-status"),
            dcc.Input(id="review-comment", placeholder="comment (optional)", maxLength=q.MAX_COMMENT_LEN,
                      className="comment", debounce=False),
            html.Button("Confirmed defect", id={"kind": "review", "decision": "confirmed", "frame": fid},
                        className="btn bad"),
            html.Button("False reject", id={"kind": "review", "decision": "false_reject", "frame": fid},
                        className="btn"),
            # a PASS frame with a defect the model missed: labelled with the candidate boxes on export
            html.Button("Missed defect", id={"kind": "review", "decision": "missed_defect", "frame": fid},
                        className="btn bad"),
            *([] if queued else [html.Button("Queue for review", id={"kind": "review", "decision": "queue",
                                                                      "frame": fid}, className="btn")]),
        ], className="review"),
    ]


@callback(Output("detail", "children"), Input("url", "search"), Input("review-done", "data"))
def on_detail(search: str | None, _: Any) -> list[Any]:
    return render_detail(q.query_param(search, "frame"), q.Filters.from_query(search))


@callback(Output("review-done", "data"), Input({"kind": "review", "decision": ALL, "frame": ALL}, "n_clicks"),
          State("review-comment", "value"), State("who", "value"), prevent_initial_call=True)
def on_review(clicks: list[int | None], comment: str | None, who: str | None) -> Any:
    from dashboard.app import current_user

    if not ctx.triggered_id or not any(clicks):
        return no_update
    t = ctx.triggered_id
    with state.db() as conn:
        if t["decision"] == "queue":  # an operator's own pick for the review queue
            q.queue_for_review(conn, t["frame"], current_user(who), comment or "")
        else:
            q.set_review(conn, t["frame"], t["decision"], current_user(who), comment or "")
    return {"frame": t["frame"], "decision": t["decision"]}
