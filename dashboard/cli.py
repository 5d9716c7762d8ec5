"""`sqis dashboard` (serve, hash-password, screenshot), `sqis bench dashboard` and
`sqis data export-reviewed`."""

from __future__ import annotations

import json
import logging
import statistics
import time
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer

from infra.cli_common import StateDir, UserError, build_settings

log = logging.getLogger(__name__)

dashboard_app = typer.Typer(help="The live dashboard (Dash): overview, line, defects, alerts, parts.",
                            invoke_without_command=True)


def _dash_settings(**kw: Any) -> Any:
    from pydantic import ValidationError

    from dashboard.settings import DashboardSettings

    try:
        return DashboardSettings(**{k: v for k, v in kw.items() if v is not None})
    except ValidationError as exc:
        msgs = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid dashboard settings (SQIS_DASHBOARD_*): {msgs}") from None


@dashboard_app.callback()
def serve(
    ctx: typer.Context,
    state_dir: StateDir = None,
    host: Annotated[str | None, typer.Option("--host", help="bind address [env SQIS_DASHBOARD_HOST; 127.0.0.1]")] = None,
    port: Annotated[int | None, typer.Option("--port", help="port [env SQIS_DASHBOARD_PORT; 8050]")] = None,
    refresh_s: Annotated[float | None, typer.Option("--refresh-s", help="live refresh interval (s)")] = None,
) -> None:
    """Serve the dashboard (reads PostgreSQL and the object store of the settings)."""
    if ctx.invoked_subcommand is not None:
        return
    import psycopg

    from dashboard.queries import DashboardError
    from infra.db import MigrationError, migrate

    s = build_settings(state_dir=state_dir)
    ds = _dash_settings(host=host, port=port, refresh_s=refresh_s)
    try:
        migrate(s.dsn())
    except (psycopg.Error, MigrationError) as exc:
        raise DashboardError(f"PostgreSQL: {' '.join(str(exc).split())[:300]}") from None
    from dashboard.app import create_app

    app = create_app(s, ds)
    if ds.host not in ("127.0.0.1", "localhost", "::1") and not ds.users:
        log.warning("dashboard exposed without login (set SQIS_DASHBOARD_USERS)", extra={"host": ds.host})
    typer.echo(f"dashboard on http://{ds.host}:{ds.port}/" + ("  (login required)" if ds.users else ""))
    try:
        from waitress import serve as wsgi_serve
    except ImportError:  # the dashboard extra brings waitress; Flask's development server otherwise
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not one line per callback request
        app.run(host=ds.host, port=ds.port, debug=False, threaded=True, dev_tools_disable_version_check=True)
        return
    wsgi_serve(app.server, host=ds.host, port=ds.port, threads=max(4, ds.pool_size * 2), ident="sqis-dashboard")


@dashboard_app.command("hash-password")
def hash_password(
    user: Annotated[str, typer.Argument(help="user name")],
    password: Annotated[str, typer.Option("--password", prompt=True, hide_input=True, confirmation_prompt=True)],
) -> None:
    """Print the SQIS_DASHBOARD_USERS entry for a user (a werkzeug scrypt hash, never the password)."""
    from werkzeug.security import generate_password_hash

    if not user.strip() or len(user) > 80:
        raise UserError("user name must be 1 to 80 characters")
    if len(password) < 8:
        raise UserError("password must have at least 8 characters")
    typer.echo(json.dumps({user: generate_password_hash(password)}))


def chrome(width: int = 1440, height: int = 1000) -> Any:
    """Headless Debian chromium through chromium-driver (selenium)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options

    opts = Options()
    for a in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}"):
        opts.add_argument(a)
    for b in ("/usr/bin/chromium", "/usr/bin/chromium-browser"):
        if Path(b).exists():
            opts.binary_location = b
            break
    return webdriver.Chrome(options=opts)


def take_screenshot(url: str, out: Path, wait_for: str = ".kpi-value", timeout: float = 30.0,
                    width: int = 1440, height: int = 1000) -> Path:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    drv = chrome(width, height)
    try:
        drv.get(url)
        WebDriverWait(drv, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, wait_for)))
        time.sleep(1.0)  # let the charts draw, then wait for the frames to arrive
        WebDriverWait(drv, timeout).until(lambda d: d.execute_script(
            "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))
        out.parent.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(out))
    finally:
        drv.quit()
    return out


@dashboard_app.command("screenshot")
def screenshot(
    out: Annotated[Path, typer.Argument(help="PNG to write")] = Path("docs/dashboard.png"),
    url: Annotated[str, typer.Option("--url", help="a running dashboard's page")] = "http://127.0.0.1:8050/",
    wait_for: Annotated[str, typer.Option("--wait-for", help="CSS selector that shows the page is drawn")] = ".kpi-value",
    width: Annotated[int, typer.Option(min=320, max=4000)] = 1440,
    height: Annotated[int, typer.Option(min=240, max=4000)] = 1000,
) -> None:
    """Screenshot a running dashboard (headless chromium) — how the README image is made during `make demo`."""
    from selenium.common.exceptions import TimeoutException, WebDriverException

    try:
        take_screenshot(url, out, wait_for, width=width, height=height)
    except TimeoutException:
        raise UserError(f"{url}: no {wait_for!r} within 30 s (is the dashboard running, with data?)") from None
    except WebDriverException as exc:
        raise UserError(f"headless chromium failed: {' '.join(str(exc).split())[:200]}") from None
    typer.echo(f"screenshot -> {out}")


# ---- sqis bench dashboard ---------------------------------------------------------------------


def bench_dashboard(
    state_dir: StateDir = None,
    rows: Annotated[int, typer.Option("--rows", min=1000, max=50_000_000, help="inspections to fill in")] = 1_000_000,
    repeat: Annotated[int, typer.Option("--repeat", min=3, max=1000, help="calls per callback and filter")] = 30,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    keep: Annotated[bool, typer.Option("--keep", help="keep the scratch schema")] = False,
) -> None:
    """Fill a scratch schema with ROWS synthetic inspections (+ rates, alerts, parts), then time every
    page's data callbacks (p50/p95 ms) for several filters and ranges. Target: p95 < 300 ms."""
    import psycopg
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from dashboard import state
    from dashboard.fixtures import fill_bench
    from dashboard.settings import DashboardSettings
    from infra.db import connect, migrate

    s = build_settings(state_dir=state_dir)
    base = s.dsn()
    # a scratch schema (the application role may not create databases), dropped at the end
    name = f"sqis_bench_{uuid.uuid4().hex[:8]}"
    ident = psycopg.sql.Identifier(name)
    with connect(base, autocommit=True) as c:
        c.execute(psycopg.sql.SQL("CREATE SCHEMA {}").format(ident))
    params = conninfo_to_dict(base)
    params["options"] = f"-c search_path={name}"
    dsn = make_conninfo(**params)
    result: dict[str, Any] = {"rows": rows, "repeat": repeat, "schema": name}
    try:
        migrate(dsn)
        t0 = time.perf_counter()
        with connect(dsn, autocommit=True) as c:
            result["counts"] = fill_bench(c, rows)
        result["fill_s"] = round(time.perf_counter() - t0, 1)
        from dashboard.app import create_app

        pool = state.make_pool(dsn, 2)
        create_app(s, DashboardSettings(), pool=pool)  # the pages' callbacks, bound to the scratch schema
        try:
            result["callbacks"] = _time_callbacks(repeat)
        finally:
            pool.close()
    finally:
        if not keep:
            with connect(base, autocommit=True) as c:
                c.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
    worst = max(v["p95_ms"] for v in result["callbacks"].values())
    result["worst_p95_ms"] = worst
    result["target_p95_ms"] = 300
    result["ok"] = worst < 300
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(f"{rows} inspections filled in {result['fill_s']} s")
        for k, v in result["callbacks"].items():
            typer.echo(f"  {k:<34} p50 {v['p50_ms']:7.1f} ms   p95 {v['p95_ms']:7.1f} ms")
        typer.echo(f"worst p95 {worst:.1f} ms (target < 300 ms): {'OK' if result['ok'] else 'MISSED'}")


def _time_callbacks(repeat: int) -> dict[str, dict[str, float]]:
    from dashboard import queries as q
    from dashboard import state
    from dashboard.pages import alerts, defects, line, overview, parts

    with state.db() as conn:
        fid = str(q.latest_fails(conn, q.Filters(range="7d"), limit=1)[0]["frame_id"])
        aid = q.alerts(conn, q.Filters(range="7d"), limit=1)[0]["alert_id"]
    filters = {"1h": q.Filters(range="1h"), "24h line": q.Filters(range="24h", line="line-2"),
               "7d": q.Filters(range="7d"), "7d class": q.Filters(range="7d", cls="dent"),
               "24h camera": q.Filters(range="24h", line="line-1", camera="line-1-cam-2")}
    calls: dict[str, Any] = {}
    for fk, f in filters.items():
        calls[f"overview.lines [{fk}]"] = lambda f=f: overview.render_lines(f)
        calls[f"overview.rates [{fk}]"] = lambda f=f: overview.rates_figure(f)
        calls[f"line.pchart [{fk}]"] = lambda f=f: line.pchart_figure(f)
        calls[f"line.breakdown [{fk}]"] = lambda f=f: line.breakdown_figures(f)
        calls[f"defects.gallery [{fk}]"] = lambda f=f: defects.render_gallery(f)
        calls[f"alerts.list [{fk}]"] = lambda f=f: alerts.render_list(f, "all")
        calls[f"parts [{fk}]"] = lambda f=f: parts.render_parts(f, "all")
        calls["filters.options"] = lambda: _options()
    f1 = q.Filters(range="1h")
    calls["defects.detail"] = lambda: defects.render_detail(fid, f1)
    calls["alerts.detail"] = lambda: alerts.render_detail(aid, f1)
    _, st = overview.rates_figure(f1)
    calls["overview.rates live patch [1h]"] = lambda: overview.rates_patch(f1, json.loads(json.dumps(st)))
    _, pst, _ = line.pchart_figure(f1)
    calls["line.pchart live patch [1h]"] = lambda: line.pchart_patch(f1, json.loads(json.dumps(pst)))
    out = {}
    for k, fn in calls.items():
        fn()  # warm (plans, pool)
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t) * 1000)
        ts.sort()
        out[k] = {"p50_ms": round(statistics.median(ts), 1),
                  "p95_ms": round(ts[min(len(ts) - 1, int(round(0.95 * (len(ts) - 1))))], 1)}
    return out


def _options() -> Any:
    from dashboard import queries as q
    from dashboard import state

    with state.db() as conn:
        return q.filter_options(conn)


def register(root: typer.Typer, bench_app: typer.Typer) -> None:
    """Called once from the CLI root: `sqis dashboard`, `sqis bench dashboard`."""
    root.add_typer(dashboard_app, name="dashboard")
    bench_app.command("dashboard")(bench_dashboard)
