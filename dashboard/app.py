"""The Dash app: a header with the filters (kept in the URL), one module per page under pages/, the
frame image routes and the optional login.

No CDN: Dash serves its own JavaScript (``serve_locally``) and our CSS comes from assets/; there is
no component library theme or web font to fetch.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

try:
    import dash
    from dash import Dash, Input, Output, callback, ctx, dcc, html, no_update
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the dashboard needs Dash: pip install 'sqis[dashboard]'") from exc

from flask import Response, abort, redirect, request, session
from markupsafe import escape
from werkzeug.security import check_password_hash

from dashboard import queries as q
from dashboard import state
from dashboard.settings import DashboardSettings
from infra.settings import Settings

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
PAGES = ("overview", "line", "defects", "alerts", "parts", "models")
PAGE_PATHS = {"overview": "/", "line": "/line", "defects": "/defects", "alerts": "/alerts", "parts": "/parts",
              "models": "/models"}
_OPEN_PATHS = ("/login", "/logout", "/assets/style.css", "/healthz")


def current_user(default: str | None = None) -> str:
    """The logged-in user, else the name typed in the header, else 'operator'."""
    try:
        u = session.get("user")
    except RuntimeError:  # outside a request (bench)
        u = None
    return str(u or (default or "").strip()[:80] or "operator")


def _header(login: bool) -> html.Header:
    nav = [dcc.Link(name.capitalize(), href=path, id=f"nav-{name}", className="nav-link")
           for name, path in PAGE_PATHS.items()]
    who: list[Any] = (
        [html.Span(id="who-label", className="who"), html.A("Log out", href="/logout", className="nav-link"),
         dcc.Input(id="who", type="hidden")]
        if login else
        [dcc.Input(id="who", placeholder="your name", debounce=True, persistence=True,
                   persistence_type="local", className="who-input", maxLength=80)]
    )
    return html.Header([
        html.Div([html.Span("SQIS", className="brand"), html.Span("line quality", className="brand-sub")],
                 className="brand-box"),
        html.Nav(nav, className="nav"),
        html.Div(who, className="who-box"),
    ], className="top")


def _filters() -> html.Div:
    return html.Div([
        dcc.Dropdown(id="f-line", placeholder="all lines", className="filter", clearable=True),
        dcc.Dropdown(id="f-camera", placeholder="all cameras", className="filter", clearable=True),
        dcc.Dropdown(id="f-class", placeholder="all classes", className="filter", clearable=True),
        dcc.RadioItems(id="f-range", options=list(q.RANGES), value=q.DEFAULT_RANGE, inline=True,
                       className="range"),
        html.Span(id="clock", className="clock"),
    ], className="filters")


def create_app(settings: Settings, dash_settings: DashboardSettings | None = None,
               pool: Any = None) -> Dash:
    """Build the app bound to the database and object store of ``settings``."""
    from infra.objectstore import open_store

    ds = dash_settings or DashboardSettings()
    q.set_rate_window(ds.rate_window_s)
    state.install(state.Services(settings=settings, dash_settings=ds,
                                 pool=pool or state.make_pool(settings.dsn(), ds.pool_size),
                                 store=open_store(settings)))
    app = Dash(__name__, use_pages=True, pages_folder="", assets_folder=str(ASSETS), serve_locally=True,
               title="SQIS line quality", update_title=None, suppress_callback_exceptions=True,
               compress=False)
    app.enable_dev_tools(debug=False, dev_tools_disable_version_check=True)  # offline: no version ping
    import dashboard.pages  # noqa: F401  (registers the pages)

    for name in PAGES:
        __import__(f"dashboard.pages.{name}")
    login = bool(ds.users)
    app.layout = html.Div([
        dcc.Location(id="url", refresh=False),
        dcc.Interval(id="tick", interval=int(ds.refresh_s * 1000)),
        _header(login),
        _filters(),
        html.Main(dash.page_container, className="page"),
    ])
    _routes(app, ds)
    return app


@callback(Output("url", "search"), Output("f-line", "value"), Output("f-camera", "value"),
          Output("f-class", "value"), Output("f-range", "value"),
          Output("f-line", "options"), Output("f-camera", "options"), Output("f-class", "options"),
          Input("url", "search"), Input("f-line", "value"), Input("f-camera", "value"),
          Input("f-class", "value"), Input("f-range", "value"))
def sync_filters(search: str | None, line: str | None, camera: str | None, cls: str | None,
                 rng: str | None) -> tuple[Any, ...]:
    """URL <-> filter widgets, both ways: a shared link restores the view; a change updates the URL.
    Options and values are set together (a dropdown drops a value that is not among its options)."""
    keep = (no_update,) * 3
    if ctx.triggered_id in (None, "url"):
        f = q.Filters.from_query(search)
        with state.db() as conn:
            o = q.filter_options(conn)
        # a value from a shared URL stays selectable (shown as text) even when no data has it
        opts = tuple(a + ([v] if v and v not in a else [])
                     for a, v in ((o["lines"], f.line), (o["cameras"], f.camera), (o["classes"], f.cls)))
        return (no_update, f.line, f.camera, f.cls, f.range, *opts)
    f = q.Filters(line=line or None, camera=camera or None, cls=cls or None,
                  range=rng if rng in q.RANGES else q.DEFAULT_RANGE)
    if f == q.Filters.from_query(search):  # the widgets only caught up with the URL
        return (no_update,) * 5 + keep
    return (f.to_query(), no_update, no_update, no_update, no_update, *keep)


@callback([Output(f"nav-{name}", "href") for name in PAGE_PATHS] + [Output(f"nav-{name}", "className")
          for name in PAGE_PATHS], Input("url", "search"), Input("url", "pathname"))
def nav_links(search: str | None, pathname: str | None) -> list[str]:
    qs = q.Filters.from_query(search).to_query()
    hrefs = [p + qs for p in PAGE_PATHS.values()]
    classes = ["nav-link active" if (pathname or "/") == p else "nav-link" for p in PAGE_PATHS.values()]
    return hrefs + classes


@callback(Output("clock", "children"), Input("tick", "n_intervals"))
def clock(_: int | None) -> str:
    from datetime import datetime

    return "updated " + datetime.now().strftime("%H:%M:%S")


def _routes(app: Dash, ds: DashboardSettings) -> None:
    server = app.server
    server.secret_key = ds.secret_key.get_secret_value() if ds.secret_key else secrets.token_hex(32)
    server.config.update(SESSION_COOKIE_HTTPONLY=True, SESSION_COOKIE_SAMESITE="Lax")

    @server.route("/healthz")
    def healthz() -> Response:
        return Response("ok", mimetype="text/plain")

    @server.route("/frames/<frame_id>.jpg")
    def frame(frame_id: str) -> Response:
        return _frame_response(frame_id, draw=False)

    @server.route("/frames/<frame_id>/overlay.jpg")
    def frame_overlay(frame_id: str) -> Response:
        return _frame_response(frame_id, draw=True)

    if not ds.users:
        return

    @server.before_request
    def guard() -> Any:
        if request.path in _OPEN_PATHS or session.get("user"):
            return None
        if request.path.startswith(("/_dash-update-component", "/frames/")):
            abort(401)
        return redirect("/login")

    @server.route("/login", methods=["GET", "POST"])
    def login() -> Any:
        error = ""
        if request.method == "POST":
            user = (request.form.get("user") or "")[:80]
            pw = request.form.get("password") or ""
            h = ds.users.get(user)
            if h is not None and check_password_hash(h.get_secret_value(), pw):
                session.clear()
                session["user"] = user
                log.info("login", extra={"user": user})
                return redirect("/")
            log.warning("login refused", extra={"user": user})
            error = "Unknown user or wrong password."
        return Response(_LOGIN_HTML.format(error=escape(error)), mimetype="text/html")

    @server.route("/logout")
    def logout() -> Any:
        session.clear()
        return redirect("/login")

    @callback(Output("who-label", "children"), Input("url", "pathname"))
    def who_label(_: str | None) -> str:
        return current_user()


def _frame_response(frame_id: str, draw: bool) -> Response:
    from dashboard.frames import load, overlay
    from infra.objectstore import ObjectNotFound, ObjectStoreError

    try:
        with state.db() as conn:
            rec = q.inspection(conn, frame_id) if draw else None
            uri = rec["image_uri"] if rec else q.image_uri(conn, frame_id)
    except q.DashboardError:
        abort(404)
    if uri is None:
        abort(404)
    svc = state.services()
    try:
        data = load(svc.store, uri)
        if draw and rec is not None:
            data = overlay(data, rec["defects"], max_side=1280)
    except ObjectNotFound:
        abort(404)
    except ObjectStoreError:
        abort(503)
    except ValueError:
        abort(422)
    resp = Response(data, mimetype="image/jpeg" if draw else _mimetype(uri))
    resp.headers["Cache-Control"] = "private, max-age=60"
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _mimetype(uri: str) -> str:
    ext = uri.rsplit(".", 1)[-1].lower()
    return {"png": "image/png", "bmp": "image/bmp", "webp": "image/webp"}.get(ext, "image/jpeg")


_LOGIN_HTML = """<!doctype html><html><head><meta charset="utf-8"><title>SQIS login</title>
<link rel="stylesheet" href="/assets/style.css"></head><body class="login-body">
<form method="post" class="login"><h1>SQIS line quality</h1><p class="error">{error}</p>
<label>User <input name="user" autocomplete="username" required></label>
<label>Password <input name="password" type="password" autocomplete="current-password" required></label>
<button type="submit">Log in</button></form></body></html>"""
