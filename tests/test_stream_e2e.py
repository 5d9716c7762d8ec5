"""The stream processors end to end on Apache Kafka: inspections -> rates / SPC / parts / drift processors
(one consumer group each) -> defect-rates, alerts, part-verdicts topics -> PostgreSQL tables."""

from __future__ import annotations

import json
import os
import threading
import time
from typing import Any

import pytest

from sinks.stream_tables import StreamTablesSink
from stream_processors.app import run_processors
from stream_processors.processors import (
    DriftConfig,
    DriftProcessor,
    PartsProcessor,
    RatesProcessor,
    SpcConfig,
    SpcProcessor,
)
from tests.stream_fixtures import inspection, produce_inspections, read_topic

W = 10  # window seconds
US = 1_000_000


def _scenario(line: str) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """8 windows of 40 frames (2 cameras see every part); the defect rate jumps from 5 % to 75 % in
    window 4 and camera C1's brightness halves there; one part is seen by C1 only."""
    t0 = (int(time.time()) // W) * W * US - 20 * W * US
    recs, ng_parts = [], 0
    for w in range(8):
        for k in range(20):
            fail = (k < 1) if w < 4 else (k < 15)
            ng_parts += fail
            pid = f"{line}-P{w}-{k}"
            t = t0 + w * W * US + k * 400_000
            for cam in ("C1", "C2"):
                recs.append(inspection(line=line, cam=cam, captured_at=t + (cam == "C2") * 1000, fail=fail and cam == "C1",
                                       part_id=pid, brightness=60.0 if (cam == "C1" and w >= 4) else 120.0, seq=w * 20 + k))
    recs.append(inspection(line=line, cam="C1", captured_at=t0 + 8 * W * US, part_id=f"{line}-lonely", seq=999))
    return recs, {"ng": ng_parts, "parts": 8 * 20 + 1}


def _wait(pred: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(0.5)
    return pred()


def test_processors_end_to_end_on_apache_kafka(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    s = settings_factory()
    line = f"L-{unique_id}"
    recs, expect = _scenario(line)
    produce_inspections(s, recs)

    procs = [RatesProcessor(window_s=W, grace_s=2, idle_close_s=1.0),
             SpcProcessor(SpcConfig(window_s=W, grace_s=2, warmup_points=3, min_n=10), idle_close_s=1.0),
             PartsProcessor(expected_views=2, timeout_s=2.0),
             DriftProcessor(DriftConfig(window_s=W, min_n=5, ref_points=3, h=4.0))]
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_processors(s, procs, stop)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, daemon=True)]
    sink = StreamTablesSink(s, group_id=f"sink-{unique_id}")
    threads.append(threading.Thread(target=sink.run, daemon=True))
    for t in threads:
        t.start()
    try:
        q = pg_conn.execute
        parts = _wait(lambda: q("SELECT count(*) FROM part_verdicts WHERE line_id = %s", (line,)).fetchone()[0]
                      == expect["parts"] and q("SELECT count(*) FROM alerts WHERE line_id = %s", (line,)).fetchone()[0] >= 2)
        assert parts, "part verdicts / alerts did not reach PostgreSQL"
        rates = _wait(lambda: q("SELECT window_start, frames, fails FROM defect_rates WHERE line_id = %s AND camera_id = '' "
                                "AND class_name = '' AND window_s = %s ORDER BY window_start", (line, W)).fetchall()
                      if len(q("SELECT 1 FROM defect_rates WHERE line_id = %s AND window_s = %s AND camera_id = '' "
                               "AND class_name = ''", (line, W)).fetchall()) >= 9 else None)
        assert rates is not None
        assert [r[1] for r in rates[:8]] == [40] * 8
        assert [r[2] for r in rates[:8]] == [1] * 4 + [15] * 4
        cam = q("SELECT frames FROM defect_rates WHERE line_id = %s AND camera_id = 'C2' AND window_s = %s LIMIT 1",
                (line, W)).fetchone()
        assert cam == (20,)
        sliding = q("SELECT count(*) FROM defect_rates WHERE line_id = %s AND window_s = %s", (line, 15 * W)).fetchone()[0]
        assert sliding >= 8

        alerts = q("SELECT kind, rule, state, camera_id, example_frame_ids, value, ucl FROM alerts WHERE line_id = %s "
                   "ORDER BY kind", (line,)).fetchall()
        kinds = {a[0]: a for a in alerts}
        assert set(kinds) == {"drift", "spc"}
        spc = kinds["spc"]
        assert spc[1] == "run_2of2_beyond_3sigma" and spc[2] == "open" and spc[4] and spc[5] > spc[6]
        drift = kinds["drift"]
        assert drift[1] == "cusum_brightness" and drift[3] == "C1"

        pv = dict(q("SELECT verdict, count(*) FROM part_verdicts WHERE line_id = %s GROUP BY 1", (line,)).fetchall())
        assert pv == {"NG": expect["ng"], "OK": expect["parts"] - expect["ng"] - 1, "INCOMPLETE": 1}
        lonely = q("SELECT verdict, views FROM part_verdicts WHERE part_id = %s", (f"{line}-lonely",)).fetchone()
        assert lonely[0] == "INCOMPLETE" and len(lonely[1]) == 1

        # the topics carry the same records (for MES and the notifiers)
        on_topic = read_topic(s, "alerts", "alert", f"r-{unique_id}", min_count=2)
        assert {a["kind"] for a in on_topic} == {"spc", "drift"}
        verdicts = read_topic(s, "part_verdicts", "part_verdict", f"p-{unique_id}", min_count=expect["parts"])
        assert len({v["part_id"] for v in verdicts}) == expect["parts"]
    finally:
        stop.set()
        sink.stop()
        for t in threads:
            t.join(30)
    assert not errors
    assert all(not t.is_alive() for t in threads)


def test_stream_cli_rejects_bad_rules_with_one_line(tmp_path: Any) -> None:
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "sqis", "stream", "spc", "--rules", "we9", "--bootstrap",
                        "127.0.0.1:1", "--state-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown SPC rule 'we9'" in r.stderr and "Traceback" not in r.stderr


pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("args", [["stream", "run"], ["sink", "stream-tables"], ["sink", "objects"],
                                  ["sink", "notify", "--channel", "webhook"]])
def test_processes_stop_cleanly_on_sigterm(settings_factory: Any, args: list[str]) -> None:
    import os
    import signal
    import subprocess
    import sys

    from sqis.bench.harness import settings_env

    s = settings_factory()
    env = os.environ | settings_env(s) | {"SQIS_NOTIFY_WEBHOOK_URL": "http://127.0.0.1:9/hook"}
    proc = subprocess.Popen([sys.executable, "-m", "sqis", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out = ""
    try:
        deadline = time.monotonic() + 60
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            out += line
            if "partitions assigned" in line or not line:
                break
        assert "partitions assigned" in out, out
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
        out += rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "loop stopped" in out


def test_restart_rebuilds_open_windows_in_full(settings_factory: Any, unique_id: str) -> None:
    """A processor stopped with a window open commits only up to that window's first frame, so the
    next run (same group) counts the window in full instead of emitting half of it."""
    from stream_processors.app import ProcessorRunner

    s = settings_factory()
    line = f"R-{unique_id}"
    t0 = (int(time.time()) // W) * W * US - 50 * W * US

    def frames(windows: range) -> list[dict[str, Any]]:
        return [inspection(line=line, cam="C1", captured_at=t0 + w * W * US + k * 200_000, seq=w * 40 + k)
                for w in windows for k in range(40)]

    group = f"stream-rates-{unique_id}"
    batch = frames(range(0, 3))
    produce_inspections(s, batch[:100])  # window 2 is open (20 of its 40 frames) when the first run stops
    first = ProcessorRunner(s, RatesProcessor(window_s=W, grace_s=1, idle_close_s=3600), group_id=group)
    first.run(max_idle_s=4)
    produce_inspections(s, batch[100:] + frames(range(3, 5)))
    second = ProcessorRunner(s, RatesProcessor(window_s=W, grace_s=1, idle_close_s=1.0), group_id=group)
    second.run(max_idle_s=5)
    got = read_topic(s, "defect_rates", "defect_rate", f"read-{unique_id}", min_count=10, timeout=15)
    last: dict[int, int] = {}
    for r in got:
        if r["line_id"] == line and r["camera_id"] == "" and r["class_name"] == "" and r["window_s"] == W:
            last[r["window_start"]] = max(last.get(r["window_start"], 0), r["frames"])
    assert [last.get(t0 + w * W * US) for w in range(5)] == [40] * 5
    # and no window was ever published with only part of its frames by the stopped run
    partial = [r for r in got if r["line_id"] == line and r["window_s"] == W and r["camera_id"] == ""
               and r["class_name"] == "" and r["frames"] < 40]
    assert partial == []


def test_spc_baseline_from_postgres_and_loaded_by_the_processor(settings_factory: Any, pg_conn: Any,
                                                                  unique_id: str) -> None:
    import subprocess
    import sys
    from datetime import UTC, datetime

    from sinks.postgres import INSPECTION_COLS, to_rows
    from sqis.bench.harness import settings_env
    from stream_processors.app import load_baselines

    line = f"B-{unique_id}"
    t0 = 1_699_999_980 * US  # on a minute boundary
    rows = []
    for m in range(25):  # 25 one-minute windows of 100 inspections, 3 FAIL each (one with 'dent')
        for k in range(100):
            rec = inspection(line=line, cam="C1", captured_at=t0 + m * 60 * US + k * 500_000, fail=k < 3,
                             cls="dent" if k == 0 else "scratch", seq=m * 100 + k)
            rows.append(to_rows(rec)[0])
    with pg_conn.cursor() as cur, cur.copy(f"COPY inspections ({', '.join(INSPECTION_COLS)}) FROM STDIN") as cp:
        for r in rows:
            cp.write_row(r)
    fails = [r[0] for r in rows if r[12] == "FAIL"]
    pg_conn.execute("INSERT INTO defects (frame_id, idx, class_id, class_name, score, x1, y1, x2, y2) "
                    "SELECT f, 0, 1, CASE WHEN n %% 3 = 1 THEN 'dent' ELSE 'scratch' END, 0.9, 0, 0, 1, 1 "
                    "FROM unnest(%s::uuid[]) WITH ORDINALITY AS t(f, n)", (fails,))
    s = settings_factory(create_topics=False)
    since = datetime.fromtimestamp(t0 / US, UTC).isoformat()
    until = datetime.fromtimestamp(t0 / US + 3600, UTC).isoformat()
    env = os.environ | settings_env(s)
    r = subprocess.run([sys.executable, "-m", "sqis", "spc", "baseline", "--line", line, "--since", since,
                        "--until", until], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert (out["frames"], out["fails"], out["points"]) == (2500, 75, 25) and out["p_bar"] == pytest.approx(0.03)
    r = subprocess.run([sys.executable, "-m", "sqis", "spc", "baseline", "--line", line, "--class", "dent",
                        "--since", since, "--until", until], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["fails"] == 25
    b = load_baselines(s)[(line, "")]
    assert b.p_bar == pytest.approx(0.03) and b.source == "baseline" and b.sigma_z >= 1.0
    # too short a period is one clear line, exit 2
    r = subprocess.run([sys.executable, "-m", "sqis", "spc", "baseline", "--line", line, "--since", since,
                        "--until", datetime.fromtimestamp(t0 / US + 300, UTC).isoformat()], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "5 windows" in r.stderr and "Traceback" not in r.stderr


def test_late_frame_updates_its_window_row(settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    """A frame arriving after its window closed (a worker catching up) is counted in that window:
    the row grows and says late = 1; the frame is never dropped."""
    s = settings_factory()
    line = f"T-{unique_id}"
    t0 = (int(time.time()) // W) * W * US - 30 * W * US
    stop = threading.Event()
    proc = RatesProcessor(window_s=W, grace_s=1, idle_close_s=1.0)
    sink = StreamTablesSink(s, group_id=f"sink-{unique_id}")
    threads = [threading.Thread(target=run_processors, args=(s, [proc], stop), daemon=True),
               threading.Thread(target=sink.run, daemon=True)]
    for t in threads:
        t.start()

    def row() -> Any:
        return pg_conn.execute("SELECT frames, fails, late FROM defect_rates WHERE line_id = %s AND camera_id = '' "
                               "AND class_name = '' AND window_s = %s AND window_start = to_timestamp(%s)",
                               (line, W, t0 / US)).fetchone()

    try:
        produce_inspections(s, [inspection(line=line, cam="C1", captured_at=t0 + w * W * US + k * US, seq=k)
                                for w in range(3) for k in range(5)])
        assert _wait(lambda: row() == (5, 0, 0), 60)
        produce_inspections(s, [inspection(line=line, cam="C1", captured_at=t0 + 3 * US, fail=True, seq=99)])
        assert _wait(lambda: row() == (6, 1, 1), 60), row()
        assert proc.metrics()["late_frames"] == 1
    finally:
        stop.set()
        sink.stop()
        for t in threads:
            t.join(30)


def test_dead_letters_reach_the_table_with_their_line_and_the_overview_counts_them(
        settings_factory: Any, pg_conn: Any, unique_id: str) -> None:
    """frames.dlq -> dead_letters (once per source offset, line from the original FrameRef; an
    undecodable original still counts, without a line) -> the dashboard Overview's DLQ count."""
    from datetime import UTC, datetime, timedelta

    from dashboard import queries as q
    from infra.kafka import producer as make_producer
    from schemas.catalog import TopicCatalog
    from schemas.deadletter import dead_letter
    from schemas.serde import serialize

    s = settings_factory()
    line = f"D-{unique_id}"
    now_us = int(time.time() * US)
    ref = {"frame_id": f"00000000-0000-4000-8000-{unique_id:0>12}", "line_id": line, "camera_id": "C9", "seq": 1,
           "captured_at": now_us, "uri": "file:///nowhere.png", "width": 8, "height": 8, "encoding": "png",
           "content_sha256": "0" * 64, "size_bytes": 10}
    ref_value, ref_headers = serialize("frame_ref", ref)
    p = make_producer(s, client_id=f"dlq-{unique_id}", idempotent=False)
    topic = TopicCatalog(s.topic_prefix).frames_dlq
    for offset, (value, headers) in enumerate([(ref_value, ref_headers), (b"\x00garbage", [])]):
        dv, dh = dead_letter(source_topic=f"{s.topic_prefix}frames", source_partition=0, source_offset=offset,
                             key=b"C9", value=value, headers=headers, error_type="missing_object",
                             error_message="no such object", worker_id="w-test", frame_id=ref["frame_id"],
                             failed_at_us=now_us)
        for _ in range(2):  # a redelivered dead letter stays one row
            p.produce(topic, value=dv, key=b"C9", headers=dh)
    p.flush(10)
    sink = StreamTablesSink(s, group_id=f"sink-{unique_id}")
    t = threading.Thread(target=sink.run, kwargs={"max_idle_s": 3.0}, daemon=True)
    t.start()
    t.join(60)
    rows = pg_conn.execute("SELECT source_offset, line_id, camera_id, error_type FROM dead_letters "
                           "WHERE source_topic = %s ORDER BY source_offset", (f"{s.topic_prefix}frames",)).fetchall()
    assert rows == [(0, line, "C9", "missing_object"), (1, None, None, "missing_object")]
    assert sink.stats.dead_letters == 4  # four records consumed, two rows kept
    # the Overview lists lines that have rates; give this line one window so it shows
    pg_conn.execute("INSERT INTO defect_rates (window_start, window_s, line_id, frames, fails) VALUES (%s, 60, %s, 10, 1)",
                    (datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=1), line))
    ov = q.overview(pg_conn, q.Filters(line=line))
    assert [(r["line_id"], r["dead_letters"]) for r in ov] == [(line, 1)]
