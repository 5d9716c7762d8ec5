"""The dashboard against the real PostgreSQL (query functions with hand-made rows) and in a real
headless Chromium (Debian's chromium + chromium-driver, selenium): KPIs move, a frame shows its
overlay, an alert is acknowledged for good, a filter narrows the view. Screenshots are saved under
$SQIS_TEST_ARTIFACTS/dashboard/ (default: the system temp dir's sqis-test-artifacts/, outside the work
tree, so a test run never rewrites committed files)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dashboard import queries as q
from dashboard.fixtures import aggregate_rates, seed
from infra.stack import free_port

ARTIFACTS = Path(os.environ.get("SQIS_TEST_ARTIFACTS") or Path(tempfile.gettempdir()) / "sqis-test-artifacts") / "dashboard"
HAVE_BROWSER = bool(shutil.which("chromedriver") and (shutil.which("chromium") or shutil.which("chromium-browser")))


def _lines() -> tuple[str, str]:
    u = uuid.uuid4().hex[:6]
    return f"L{u}-a", f"L{u}-b"


@pytest.fixture(scope="module")
def dash_server(local_stack: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """One dashboard (one Dash app per process: its callbacks are global) on a free port, with its
    own object-store directory, served by werkzeug in a thread."""
    from werkzeug.serving import make_server

    from dashboard import state
    from dashboard.app import create_app
    from dashboard.settings import DashboardSettings

    store_dir = tmp_path_factory.mktemp("dash-objects")
    settings = local_stack.settings(object_store_url=store_dir.as_uri(), log_format="console")
    app = create_app(settings, DashboardSettings(refresh_s=1.0, pool_size=4))
    port = free_port()
    from werkzeug.serving import WSGIRequestHandler

    class Quiet(WSGIRequestHandler):
        def log_request(self, *args: Any, **kwargs: Any) -> None:  # one line per Dash callback is noise
            pass

    server = make_server("127.0.0.1", port, app.server, threaded=True, request_handler=Quiet)
    th = threading.Thread(target=server.serve_forever, daemon=True)
    th.start()
    try:
        yield {"url": f"http://127.0.0.1:{port}", "settings": settings, "app": app, "store": state.services().store}
    finally:
        server.shutdown()
        state.services().pool.close()


# ---- query functions against the real PostgreSQL ----------------------------------------------


def test_filter_by_line_returns_only_that_line(pg_conn: Any, dash_server: dict[str, Any]) -> None:
    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=10, per_minute=6, images=False, rng_seed=1)
    f = q.Filters(line=a)
    ov = q.overview(pg_conn, f)
    assert [r["line_id"] for r in ov] == [a]
    frames, fails = pg_conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE verdict = 'FAIL') FROM inspections WHERE line_id = %s", (a,)).fetchone()
    assert (ov[0]["frames"], ov[0]["fails"]) == (frames, fails)
    assert ov[0]["passes"] == frames - fails and ov[0]["model"] == "demo-yolov8n 1"
    assert {r["line_id"] for r in q.rate_series(pg_conn, f)} == {a}
    gallery = q.latest_fails(pg_conn, f, limit=500)
    assert gallery and {r["line_id"] for r in gallery} == {a}
    assert len(gallery) == fails
    assert {r["line_id"] for r in q.alerts(pg_conn, f)} == {a}
    assert {r["line_id"] for r in q.parts(pg_conn, f)} == {a}
    assert q.part_counts(pg_conn, f) == {"OK": 1, "NG": 1, "INCOMPLETE": 1}
    # both lines without the filter; the class filter keeps only frames with that class
    both = {r["line_id"] for r in q.overview(pg_conn, q.Filters())}
    assert {a, b} <= both
    dents = q.latest_fails(pg_conn, q.Filters(line=a, cls="dent"), limit=500)
    assert all(any(d["class_name"] == "dent" for d in r["defects"]) for r in dents)
    assert len(dents) < len(gallery)
    pc = q.pchart(pg_conn, f)
    assert pc["line_id"] == a and pc["center_source"] == "baseline" and pc["points"]
    assert all(p["lcl"] <= pc["center"] <= p["ucl"] for p in pc["points"])
    assert s.alert_ids[0] in {x["alert_id"] for x in pc["alerts"]}


@pytest.mark.parametrize("evil", ["x' OR '1'='1", "'; DROP TABLE alerts; --", "line-1\") OR 1=1 --"])
def test_sql_injection_in_a_filter_returns_nothing(pg_conn: Any, dash_server: dict[str, Any], evil: str) -> None:
    a, b = _lines()
    seed(pg_conn, dash_server["store"], lines=(a, b), minutes=3, per_minute=4, images=False, rng_seed=2)
    n_alerts = pg_conn.execute("SELECT count(*) FROM alerts").fetchone()[0]
    f = q.Filters.from_query("?" + __import__("urllib.parse").parse.urlencode({"line": evil, "camera": evil, "class": evil}))
    assert (f.line, f.camera, f.cls) == (evil, evil, evil)
    for fn in (q.overview, q.rate_series, q.latest_fails, q.alerts, q.parts):
        assert fn(pg_conn, f) == [], fn.__name__
    assert q.rates_by(pg_conn, f, "camera") == [] and q.alert(pg_conn, evil) is None
    assert q.pchart(pg_conn, f)["points"] == []
    assert q.acknowledge(pg_conn, evil, evil, evil) is False
    # nothing broke: the tables are there and untouched
    assert pg_conn.execute("SELECT count(*) FROM alerts").fetchone()[0] == n_alerts
    assert q.overview(pg_conn, q.Filters(line=a))[0]["line_id"] == a


def test_html_in_a_comment_is_stored_and_rendered_as_text(pg_conn: Any, dash_server: dict[str, Any]) -> None:
    from dashboard.pages import alerts as alerts_page

    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=2, per_minute=4, images=False, rng_seed=3)
    comment = "<b>bold</b> <script>alert('x')</script> & done"
    assert q.acknowledge(pg_conn, s.alert_ids[0], "<i>eve</i>", comment) is True
    assert q.acknowledge(pg_conn, s.alert_ids[0], "bob", "again") is False  # only an open alert is acknowledged
    row = q.alert(pg_conn, s.alert_ids[0])
    assert row is not None and row["state"] == "acknowledged" and row["ack_comment"] == comment
    assert row["acknowledged_by"] == "<i>eve</i>" and row["acknowledged_at"] is not None
    rendered = alerts_page.render_detail(s.alert_ids[0], q.Filters())
    text = json.dumps([c.to_plotly_json() for c in rendered], default=lambda o: o.to_plotly_json())
    assert json.dumps(comment)[1:-1] in text  # a plain string child: React renders it as text
    assert "dangerouslySetInnerHTML" not in text and "Markdown" not in text


def test_review_and_export_reviewed(pg_conn: Any, dash_server: dict[str, Any], tmp_path: Path) -> None:
    from training.reviewed import export_reviewed

    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=4, per_minute=6, fail_rate=0.5, rng_seed=4)
    since = datetime.now(UTC) - timedelta(seconds=1)
    masked = {r[0] for r in pg_conn.execute("SELECT DISTINCT frame_id FROM defects WHERE frame_id = ANY(%s)"
                                            " AND mask_rle IS NOT NULL", (s.fail_ids,))}
    yes = next(f for f in s.fail_ids if f in masked)  # a confirmed frame with a mask
    no = next(f for f in s.fail_ids if f != yes)
    q.set_review(pg_conn, yes, "confirmed", "qe", "real scratch")
    q.set_review(pg_conn, no, "false_reject", "qe", "<dust>")
    q.set_review(pg_conn, no, "false_reject", "qe2", "dust on the lens")  # the latest decision wins
    with pytest.raises(q.DashboardError):
        q.set_review(pg_conn, uuid.uuid4(), "confirmed", "qe")
    with pytest.raises(q.DashboardError):
        q.set_review(pg_conn, yes, "maybe", "qe")
    assert [r["frame_id"] for r in q.latest_fails(pg_conn, q.Filters(line=a), review="false_reject")] == (
        [no] if pg_conn.execute("SELECT line_id FROM inspections WHERE frame_id = %s", (no,)).fetchone()[0] == a else [])
    card = export_reviewed(dash_server["settings"], tmp_path / "reviewed", since=since)
    assert card.total_images == 2 and card.format == "sqis-reviews"
    labels = {p.stem: p.read_text() for p in (tmp_path / "reviewed" / "labels").rglob("*.txt")}
    n_boxes = pg_conn.execute("SELECT count(*) FROM defects WHERE frame_id = %s", (yes,)).fetchone()[0]
    assert len(labels[str(yes)].splitlines()) == n_boxes >= 1
    assert labels[str(no)] == ""  # a false reject is a defect-free example
    seg = {p.stem: p.read_text() for p in (tmp_path / "reviewed" / "labels-seg").rglob("*.txt")}
    assert len(seg[str(yes)].splitlines()) == 1 and len(seg[str(yes)].split()) >= 7  # class + >= 3 points
    assert card.has_segments
    assert (tmp_path / "reviewed" / "data.yaml").is_file()


def test_review_queue_view_lists_queued_frames_and_offers_the_missed_defect(pg_conn: Any,
                                                                           dash_server: dict[str, Any]) -> None:
    from dashboard.pages import defects as page
    from infra.review_queue import ReviewItem, Sampler

    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=1, per_minute=4, fail_rate=0.0, images=False,
             rng_seed=5)
    auto, pick = [f for f in s.frame_ids if pg_conn.execute(
        "SELECT line_id FROM inspections WHERE frame_id = %s", (f,)).fetchone()[0] == a][:2]
    Sampler(rate=1.0, per_hour=5, spread=False).offer(pg_conn, [ReviewItem(str(auto), a, ("uncertain",), score=0.21,
        margin=-0.04, candidates=[{"class_id": 0, "class_name": "scratch", "score": 0.21, "x1": 5, "y1": 6, "x2": 40,
                                   "y2": 50}])])
    unqueued = page.render_detail(str(pick), q.Filters())
    assert "Queue for review" in json.dumps([c.to_plotly_json() for c in unqueued], default=lambda o: o.to_plotly_json())
    q.queue_for_review(pg_conn, pick, "op")
    cards = json.dumps([c.to_plotly_json() for c in page.render_gallery(q.Filters(line=a), "queue")],
                       default=lambda o: o.to_plotly_json())
    assert cards.index(str(auto)) < cards.index(str(pick))  # oldest first
    assert "near threshold (auto)" in cards and "operator's pick (operator)" in cards
    detail = json.dumps([c.to_plotly_json() for c in page.render_detail(str(auto), q.Filters())],
                        default=lambda o: o.to_plotly_json())
    assert "Missed defect" in detail and "detail-candidates" in detail and "near threshold" in detail
    assert "Queue for review" not in detail  # already queued


def test_frame_route_serves_only_store_objects(pg_conn: Any, dash_server: dict[str, Any]) -> None:
    from dashboard.frames import in_store

    store = dash_server["store"]
    a, b = _lines()
    s = seed(pg_conn, store, lines=(a, b), minutes=2, per_minute=4, fail_rate=0.9, rng_seed=5)
    fid = s.fail_ids[0]
    base = dash_server["url"]
    raw = urllib.request.urlopen(f"{base}/frames/{fid}.jpg").read()
    drawn = urllib.request.urlopen(f"{base}/frames/{fid}/overlay.jpg").read()
    assert raw[:2] == drawn[:2] == b"\xff\xd8" and raw != drawn
    # an inspection whose image URI points outside the store is refused, never read
    evil = uuid.uuid4()
    pg_conn.execute(
        "INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at, image_uri, width,"
        " height, model_name, model_version, verdict) VALUES (%s, %s, 'c', 0, now(), now(), %s, 1, 1, 'm', '1', 'PASS')",
        (evil, a, store.url + "/../../../etc/passwd"))
    for path in (f"/frames/{evil}.jpg", f"/frames/{evil}/overlay.jpg", "/frames/not-a-uuid.jpg",
                 f"/frames/{uuid.uuid4()}.jpg"):
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + path)
        assert e.value.code == 404, path
    # a path in the URL is not a key: it falls through to the app's page, never to a file
    resp = urllib.request.urlopen(base + "/frames/..%2F..%2F..%2Fetc%2Fpasswd")
    assert resp.headers["Content-Type"].startswith("text/html") and b"root:" not in resp.read()
    assert not in_store(store, "file:///etc/passwd") and not in_store(store, "s3://other/x.jpg")
    assert in_store(store, store.url + "/frames/x.jpg")


# ---- the browser ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not HAVE_BROWSER:
        pytest.fail("chromium and chromium-driver are missing: run `make sysdeps`")
    from dashboard.cli import chrome

    drv = chrome(1440, 1000)
    drv.implicitly_wait(0)
    try:
        yield drv
    finally:
        drv.quit()


def _wait(drv: Any, css: str, timeout: float = 20.0) -> Any:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(drv, timeout).until(EC.presence_of_element_located((By.CSS_SELECTOR, css)))


def _until(fn: Any, timeout: float = 20.0, what: str = "") -> Any:
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            last = fn()
            if last:
                return last
        except Exception as exc:  # stale elements while Dash re-renders
            last = exc
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def _texts(drv: Any, css: str) -> list[str]:
    """Texts of the elements matching css, read in one go (Dash re-renders them every refresh)."""
    return list(drv.execute_script(
        "return Array.from(document.querySelectorAll(arguments[0])).map(e => e.textContent)", css))


def _shot(drv: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    drv.save_screenshot(str(ARTIFACTS / f"{name}.png"))


def test_line_page_without_a_line_charts_the_first_line_with_rates(pg_conn: Any, dash_server: dict[str, Any],
                                                                   browser: Any) -> None:
    """No line chosen: the first line with rates in the range (from the table the Overview reads, even
    while the hourly roll-up lags), links to the others; an empty chart keeps a time axis."""
    from dashboard.pages import line as line_page

    u = uuid.uuid4().hex[:6]
    a, b = f"0{u}-a", f"0{u}-b"  # sort before the other tests' lines
    seed(pg_conn, dash_server["store"], lines=(a, b), minutes=10, per_minute=6, images=False, rng_seed=12)
    pg_conn.execute("DELETE FROM defect_rates_hourly WHERE line_id IN (%s, %s)", (a, b))
    f = q.Filters(range="15m")
    assert q.lines_with_rates(pg_conn, f)[:2] == [a, b]
    fig, st, note = line_page.pchart_figure(f)
    assert st["line"] == a and len(fig["data"][0]["x"]) >= 5
    assert f"showing {a}" in str(note) and f"/line?line={b}&range=15m" in str(note)
    fig, st, note = line_page.pchart_figure(q.Filters(line=f"{a}-none", range="15m"))
    assert fig["data"] == [] and fig["layout"]["xaxis"]["type"] == "date"
    assert fig["layout"]["yaxis"]["range"] == [0, 0.1] and st["n"] == 0

    browser.get(f"{dash_server['url']}/line?range=15m")
    _until(lambda: any(f"showing {a}" in t for t in _texts(browser, "#line-note")), what="the first line's chart")
    assert _texts(browser, "#pchart .gtitle") == [f"p-chart · {a}"]
    _shot(browser, "line-no-line-chosen")


def test_browser_overview_kpis_change_and_filter_narrows(pg_conn: Any, dash_server: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    a, b = _lines()
    seed(pg_conn, dash_server["store"], lines=(a, b), minutes=10, per_minute=6, images=False, rng_seed=6)
    base = dash_server["url"]
    browser.get(f"{base}/?range=15m")
    _until(lambda: {a, b} <= set(_texts(browser, ".line-card h3")), what="both lines")
    _shot(browser, "overview-all-lines")

    # a filter narrows the view (chosen in the dropdown; kept in the URL)
    browser.find_element(By.ID, "f-line").click()
    _wait(browser, ".dash-dropdown-content input.dash-dropdown-search").send_keys(a)
    _until(lambda: [o for o in browser.find_elements(By.CSS_SELECTOR, ".dash-dropdown-content [role=option]")
                    if o.text == a], what="the line in the dropdown")[0].click()
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)
    _until(lambda: _texts(browser, ".line-card h3") == [a], what="one line")
    assert f"line={a}" in browser.current_url
    _shot(browser, "overview-filtered")

    # the KPIs follow the line as new inspections arrive (live refresh, no reload)
    css = f"#kpi-frames-{a} .kpi-value"
    _wait(browser, css)
    before = int(_texts(browser, css)[0].replace(",", ""))
    now = datetime.now(UTC)
    pg_conn.execute(
        "INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at, image_uri, width, height,"
        " model_name, model_version, verdict, total_ms, worker_id) SELECT gen_random_uuid(), %s, %s, g, %s, %s, 'x', 1, 1,"
        " 'demo-yolov8n', '1', 'PASS', 20, 'w' FROM generate_series(1, 25) g",
        (a, f"{a}-cam-1", now - timedelta(seconds=1), now))
    aggregate_rates(pg_conn, now - timedelta(minutes=2), now + timedelta(minutes=1), lines=[a])
    after = _until(lambda: (v := int(_texts(browser, css)[0].replace(",", ""))) > before and v,
                   what="the frames KPI to grow")
    assert after == before + 25
    _shot(browser, "overview-updated")


def test_browser_defects_shows_frame_with_overlay_and_review(pg_conn: Any, dash_server: dict[str, Any],
                                                             browser: Any) -> None:
    from selenium.webdriver.common.by import By

    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=3, per_minute=6, fail_rate=0.6, rng_seed=7)
    fid = next(f for f in reversed(s.fail_ids)
               if pg_conn.execute("SELECT line_id FROM inspections WHERE frame_id = %s", (f,)).fetchone()[0] == a)
    browser.get(f"{dash_server['url']}/defects?line={a}&frame={fid}")
    img = _wait(browser, "#detail-image")
    assert img.get_attribute("src").endswith(f"/frames/{fid}/overlay.jpg")
    _until(lambda: browser.execute_script("const i = document.getElementById('detail-image');"
                                          " return i && i.complete && i.naturalWidth;") == 256, what="the frame image")
    srcs = _until(lambda: browser.execute_script(
        "return Array.from(document.querySelectorAll('.gallery .card img')).map(i => i.getAttribute('src'))"),
        what="gallery")
    assert all(s.startswith("/frames/") and s.endswith("/overlay.jpg") for s in srcs)
    facts = browser.find_element(By.ID, "detail-facts").text
    assert "demo-yolov8n 1" in facts and "score ≥ 0.25" in facts
    _shot(browser, "defects-detail")
    browser.find_element(By.CSS_SELECTOR, "#review-comment").send_keys("dust")
    browser.find_element(By.XPATH, "//button[text()='False reject']").click()
    _until(lambda: "false reject" in browser.find_element(By.ID, "review-status").text, what="review recorded")
    assert pg_conn.execute("SELECT decision, comment FROM inspection_reviews WHERE frame_id = %s",
                           (fid,)).fetchone() == ("false_reject", "dust")


def test_browser_alert_acknowledged_stays_after_reload(pg_conn: Any, dash_server: dict[str, Any], browser: Any) -> None:
    from selenium.webdriver.common.by import By

    a, b = _lines()
    s = seed(pg_conn, dash_server["store"], lines=(a, b), minutes=3, per_minute=4, images=False, rng_seed=8)
    aid = s.alert_ids[0]
    browser.get(f"{dash_server['url']}/alerts?line={a}")
    _until(lambda: aid[:12] in browser.find_element(By.ID, "alert-table").text or
           "we1_beyond_3sigma" in browser.find_element(By.ID, "alert-table").text, what="the open alert")
    browser.find_element(By.LINK_TEXT, "details").click()
    _wait(browser, "#ack-button")
    assert f"alert_id={aid}" in browser.current_url
    comment = "<b>checked</b> camera 2 & <script>x()</script>"
    browser.find_element(By.ID, "ack-comment").send_keys(comment)
    browser.find_element(By.ID, "ack-button").click()
    shown = _until(lambda: browser.find_element(By.ID, "ack-comment-text").text, what="acknowledged")
    assert shown == comment
    browser.refresh()
    shown = _wait(browser, "#ack-comment-text")
    _until(lambda: browser.find_element(By.ID, "ack-comment-text").text == comment, what="after reload")
    assert browser.find_elements(By.CSS_SELECTOR, "#ack-comment-text b, #ack-comment-text script") == []
    assert "acknowledged" in browser.find_element(By.ID, "alert-facts").text
    _shot(browser, "alert-acknowledged")
    assert pg_conn.execute("SELECT state FROM alerts WHERE alert_id = %s", (aid,)).fetchone()[0] == "acknowledged"


def test_login_with_password_hashes(dash_server: dict[str, Any]) -> None:
    """With users configured, every page and route needs a login; the settings hold hashes only."""
    from dash import Dash, html
    from pydantic import ValidationError
    from werkzeug.security import generate_password_hash

    from dashboard.app import _routes
    from dashboard.settings import DashboardSettings

    with pytest.raises(ValidationError):
        DashboardSettings(users={"alice": "plain-text-password"})
    ds = DashboardSettings(users={"alice": generate_password_hash("correct horse")}, secret_key="s" * 32)
    app = Dash(__name__, use_pages=False)  # a second app only for the Flask routes and the guard
    app.layout = html.Div("in")
    _routes(app, ds)
    c = app.server.test_client()
    r = c.get("/")
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    assert c.get(f"/frames/{uuid.uuid4()}.jpg").status_code == 401
    r = c.post("/login", data={"user": "alice", "password": "wrong"})
    assert r.status_code == 200 and b"wrong password" in r.data
    r = c.post("/login", data={"user": "<script>", "password": "x"})
    assert b"<script>" not in r.data
    r = c.post("/login", data={"user": "alice", "password": "correct horse"})
    assert r.status_code == 302
    assert c.get("/").status_code == 200
    assert c.get(f"/frames/{uuid.uuid4()}.jpg").status_code == 404  # past the guard: simply not there
    c.get("/logout")
    assert c.get("/").status_code == 302


def test_hourly_rollup_follows_the_minute_rates(pg_conn: Any, dash_server: dict[str, Any]) -> None:
    """The trigger of migration 003 keeps defect_rates_hourly equal to the sum of the 1-minute rows
    through inserts, upserts and deletes; the 7-day views read it."""
    a, b = _lines()
    seed(pg_conn, dash_server["store"], lines=(a, b), minutes=90, per_minute=2, images=False, rng_seed=9)

    def both() -> tuple[Any, Any]:
        m = pg_conn.execute("SELECT camera_id, class_name, sum(frames), sum(fails) FROM defect_rates WHERE line_id = %s"
                            " AND window_s = 60 GROUP BY 1, 2 ORDER BY 1, 2", (a,)).fetchall()
        h = pg_conn.execute("SELECT camera_id, class_name, sum(frames), sum(fails) FROM defect_rates_hourly"
                            " WHERE line_id = %s GROUP BY 1, 2 ORDER BY 1, 2", (a,)).fetchall()
        return m, h

    m, h = both()
    assert m and m == h
    pg_conn.execute("UPDATE defect_rates SET frames = frames + 7, fails = fails + 2 WHERE line_id = %s"
                    " AND camera_id = '' AND class_name = '' AND window_start = (SELECT max(window_start)"
                    " FROM defect_rates WHERE line_id = %s)", (a, a))
    pg_conn.execute("DELETE FROM defect_rates WHERE line_id = %s AND class_name = 'dent'", (a,))
    m2, h2 = both()
    assert m2 == h2 and m2 != m
    week = q.overview(pg_conn, q.Filters(line=a, range="7d"))[0]
    frames = pg_conn.execute("SELECT sum(frames) FROM defect_rates WHERE line_id = %s AND camera_id = ''"
                             " AND class_name = '' AND window_s = 60", (a,)).fetchone()[0]
    assert week["frames"] == frames
    pts = q.rate_series(pg_conn, q.Filters(line=a, range="7d"))
    assert len(pts) in (2, 3) and sum(p["frames"] for p in pts) == frames  # 90 minutes: 2-3 hourly points


# ---- pure logic --------------------------------------------------------------------------------


_text = st.none() | st.text(min_size=1, max_size=q.MAX_FILTER_LEN)


@given(line=_text, camera=_text, cls=_text, rng=st.sampled_from(list(q.RANGES)))
def test_filters_round_trip_through_the_url(line: str | None, camera: str | None, cls: str | None, rng: str) -> None:
    f = q.Filters(line=line, camera=camera, cls=cls, range=rng)
    assert q.Filters.from_query(f.to_query()) == f


def test_filters_from_a_bad_url_fall_back() -> None:
    f = q.Filters.from_query("?range=forever&line=" + "x" * 5000 + "&unknown=1")
    assert f.range == q.DEFAULT_RANGE and f.line == "x" * q.MAX_FILTER_LEN
    assert q.Filters.from_query(None) == q.Filters() and q.Filters().to_query() == ""


@given(p=st.floats(0, 1), n=st.integers(1, 10**7))
def test_p_limits_bracket_the_centre(p: float, n: int) -> None:
    lcl, ucl = q.p_limits(p, n)
    assert 0.0 <= lcl <= p <= ucl <= 1.0
    lcl4, ucl4 = q.p_limits(p, 4 * n)  # a bigger subgroup: narrower limits
    assert lcl <= lcl4 and ucl4 <= ucl
    if 0 < lcl and ucl < 1:  # unclipped: 4x the subgroup halves the width
        assert abs((ucl4 - p) - (ucl - p) / 2) < 1e-9


def test_bucket_width_keeps_charts_small() -> None:
    for r in q.RANGES.values():
        b = q.bucket_seconds(r)
        assert r / b <= q.MAX_POINTS and b % q.RATE_WINDOW_S == 0
    assert q.bucket_seconds(q.RANGES["7d"]) % 3600 == 0  # long ranges read the hourly roll-up


def test_live_refresh_appends_points_with_a_patch(pg_conn: Any, dash_server: dict[str, Any]) -> None:
    """A refresh sends only the new points (Patch operations), not the whole figure again."""
    from dashboard.pages import line as line_page
    from dashboard.pages import overview

    a, b = _lines()
    seed(pg_conn, dash_server["store"], lines=(a, b), minutes=5, per_minute=6, images=False, rng_seed=10,
         now=datetime.now(UTC) - timedelta(minutes=2))
    f = q.Filters(line=a, range="15m")
    fig, st = overview.rates_figure(f)
    n0 = st["lines"][a]["n"]
    assert len(fig["data"][0]["x"]) == n0 >= 5
    _, pst, _ = line_page.pchart_figure(f)
    now = datetime.now(UTC)
    pg_conn.execute(
        "INSERT INTO inspections (frame_id, line_id, camera_id, seq, captured_at, inspected_at, image_uri, width, height,"
        " model_name, model_version, verdict) SELECT gen_random_uuid(), %s, 'c', g, %s, %s, 'x', 1, 1, 'm', '1',"
        " CASE WHEN mod(g, 2) = 0 THEN 'FAIL' ELSE 'PASS' END FROM generate_series(1, 10) g", (a, now, now))
    aggregate_rates(pg_conn, now - timedelta(minutes=1), now + timedelta(minutes=1), lines=[a])
    out = overview.rates_patch(f, json.loads(json.dumps(st)))
    assert out is not None
    patch, st2 = out
    ops = patch.to_plotly_json()["operations"]
    extends = [o for o in ops if o["operation"] == "Extend" and o["location"] == ["data", 0, "x"]]
    assert extends and st2["lines"][a]["n"] == n0 + 1  # one new minute appended
    assert not any(o["location"] == ["data"] for o in ops)  # never the whole data array
    pout = line_page.pchart_patch(f, json.loads(json.dumps(pst)))
    assert pout is not None
    pops = pout[0].to_plotly_json()["operations"]
    assert {tuple(o["location"]) for o in pops if o["operation"] == "Extend"} >= {
        ("data", 0, "x"), ("data", 1, "y"), ("data", 2, "y")}
