"""Hand-made rows for the dashboard's tables: the tests, the README screenshot and the benchmark
write them instead of depending on the stream processors' code.

``seed`` writes a small, realistic line (frames in the object store, inspections, defects with
boxes and a mask, 1-minute rates, a baseline, alerts, part verdicts). ``fill_bench`` fills a
database with N synthetic inspections server-side (generate_series, no Python per row) and the
rate tables aggregated from them.
"""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import cv2
import numpy as np
from psycopg import Connection

from infra.objectstore import FileStore, S3Store

CLASSES = ("scratch", "dent", "spot")


@dataclass
class Seeded:
    """What ``seed`` wrote (ids the tests look for)."""

    lines: list[str]
    frame_ids: list[uuid.UUID] = field(default_factory=list)
    fail_ids: list[uuid.UUID] = field(default_factory=list)
    alert_ids: list[str] = field(default_factory=list)
    part_ids: list[str] = field(default_factory=list)


def frame_image(rng: random.Random, boxes: Sequence[tuple[int, int, int, int]], size: int = 256) -> bytes:
    """A grey metal-like plate with dark marks where the boxes are (JPEG)."""
    base = rng.randint(110, 150)
    img = np.full((size, size), base, np.uint8)
    noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 6, (size, size))
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    for x1, y1, x2, y2 in boxes:
        cv2.line(img, (x1 + 2, y1 + 2), (x2 - 2, y2 - 2), int(base * 0.35), 3)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))
    assert ok
    return buf.tobytes()


def rle_of_box(h: int, w: int, box: tuple[int, int, int, int]) -> dict[str, Any]:
    """COCO uncompressed RLE (column-major) of a filled ellipse inside the box."""
    m = np.zeros((h, w), np.uint8)
    x1, y1, x2, y2 = box
    cv2.ellipse(m, ((x1 + x2) // 2, (y1 + y2) // 2), (max(1, (x2 - x1) // 2), max(1, (y2 - y1) // 2)), 0, 0, 360, 1, -1)
    flat = m.flatten(order="F")
    counts, cur, run = [], 0, 0
    for v in flat:
        if v != cur:
            counts.append(run)
            cur, run = v, 0
        run += 1
    counts.append(run)
    return {"height": h, "width": w, "counts": [int(c) for c in counts], "area": int(m.sum())}


def seed(conn: Connection[Any], store: FileStore | S3Store, *, lines: Sequence[str] = ("line-1", "line-2"),
         cameras: int = 2, minutes: int = 30, per_minute: int = 6, fail_rate: float = 0.25,
         now: datetime | None = None, rng_seed: int = 0, images: bool = True,
         spike_line: str | None = None) -> Seeded:
    """A small line's worth of rows ending at ``now``; ``spike_line`` gets a high last few minutes."""
    rng = random.Random(rng_seed)
    now = now or datetime.now(UTC)
    out = Seeded(lines=list(lines))
    size = 256
    inspections, defects = [], []
    for li, line in enumerate(lines):
        for m in range(minutes):
            t0 = now - timedelta(minutes=minutes - m)
            rate = fail_rate * (3.0 if spike_line == line and m >= minutes - 3 else 1.0)
            for k in range(per_minute):
                cam = f"{line}-cam-{k % cameras + 1}"
                fid = uuid.uuid4()
                captured = t0 + timedelta(seconds=k * 60.0 / per_minute)
                fail = rng.random() < min(rate, 0.95)
                boxes = []
                if fail:
                    for _ in range(rng.randint(1, 2)):
                        x1, y1 = rng.randint(10, 180), rng.randint(10, 180)
                        boxes.append((x1, y1, x1 + rng.randint(25, 70), y1 + rng.randint(25, 70)))
                uri = f"file:///nonexistent/{fid}.jpg"
                if images and (fail or k == 0):
                    uri = store.put(f"frames/{line}/{cam}/{fid}.jpg", frame_image(rng, boxes, size), "image/jpeg")
                total = rng.uniform(20, 60)
                inspections.append((
                    fid, line, cam, m * per_minute + k, f"{line}-part-{m:04d}-{k // cameras}", captured,
                    captured + timedelta(milliseconds=total + rng.uniform(5, 40)), uri, size, size, "demo-yolov8n",
                    str(1 + li), "FAIL" if fail else "PASS", len(boxes),
                    json.dumps({"default_score": 0.25, "iou": 0.45, "per_class": {"dent": 0.4}}),
                    json.dumps({"fetch_ms": 3.1, "infer_ms": round(total - 8, 1), "total_ms": round(total, 1)}),
                    total, 4, f"worker-{li + 1}",
                ))
                for i, b in enumerate(boxes):
                    cls = rng.randrange(len(CLASSES))
                    rle = rle_of_box(size, size, b) if i == 0 and cls == 0 else None
                    defects.append((fid, i, cls, CLASSES[cls], round(rng.uniform(0.3, 0.97), 3), *b,
                                    json.dumps({k: rle[k] for k in ("height", "width", "counts")}) if rle else None,
                                    rle["area"] if rle else None))
                out.frame_ids.append(fid)
                if fail:
                    out.fail_ids.append(fid)
    with conn.transaction():
        with conn.cursor() as cur:
            with cur.copy("COPY inspections (frame_id, line_id, camera_id, seq, part_id, captured_at, inspected_at,"
                          " image_uri, width, height, model_name, model_version, verdict, n_defects, thresholds,"
                          " timings, total_ms, batch_size, worker_id) FROM STDIN") as cp:
                for r in inspections:
                    cp.write_row(r)
            with cur.copy("COPY defects (frame_id, idx, class_id, class_name, score, x1, y1, x2, y2, mask_rle,"
                          " mask_area) FROM STDIN") as cp:
                for r in defects:
                    cp.write_row(r)
        since = now - timedelta(minutes=minutes + 1)
        aggregate_rates(conn, since, now + timedelta(minutes=1), lines=list(lines))
        for line in lines:
            conn.execute(
                "INSERT INTO spc_baselines (line_id, class_name, p_bar, frames, fails, since, until)"
                " VALUES (%s, '', %s, 10000, %s, %s, %s) ON CONFLICT (line_id, class_name) DO UPDATE"
                " SET p_bar = EXCLUDED.p_bar", (line, fail_rate, int(10000 * fail_rate), since - timedelta(days=1), since))
        for i, line in enumerate(lines):
            ws = now - timedelta(minutes=2 + i)
            aid = f"spc-{line}-{uuid.uuid4().hex[:8]}"
            conn.execute(
                "INSERT INTO alerts (alert_id, kind, rule, severity, state, line_id, window_start, window_end, value,"
                " center, lcl, ucl, message, details, example_frame_ids, opened_at) VALUES (%s, 'spc',"
                " 'we1_beyond_3sigma', 'critical', 'open', %s, %s, %s, %s, %s, 0, %s, %s, %s, %s, %s)",
                (aid, line, ws.replace(second=0, microsecond=0), ws.replace(second=0, microsecond=0) + timedelta(minutes=1),
                 min(0.95, fail_rate * 3), fail_rate, min(1.0, fail_rate * 2.2),
                 f"{line}: defect rate beyond 3σ", json.dumps({"points": [fail_rate * 3], "n": per_minute}),
                 [str(x) for x in out.fail_ids[-2:]], ws + timedelta(minutes=1)))
            out.alert_ids.append(aid)
            for j, verdict in enumerate(("OK", "NG", "INCOMPLETE")):
                pid = f"{line}-part-{uuid.uuid4().hex[:6]}"
                views = [{"camera_id": f"{line}-cam-{c + 1}", "frame_id": str(out.frame_ids[j * cameras + c]),
                          "verdict": "PASS" if verdict == "OK" else "FAIL"} for c in range(cameras - (verdict == "INCOMPLETE"))]
                conn.execute(
                    "INSERT INTO part_verdicts (part_id, line_id, verdict, expected_views, views, missing_cameras,"
                    " worst_class, worst_score, first_seen_at, decided_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (pid, line, verdict, cameras, json.dumps(views),
                     [f"{line}-cam-{cameras}"] if verdict == "INCOMPLETE" else [],
                     "scratch" if verdict == "NG" else None, 0.81 if verdict == "NG" else None,
                     now - timedelta(minutes=5 + j), now - timedelta(minutes=4 + j)))
                out.part_ids.append(pid)
    return out


def aggregate_rates(conn: Connection[Any], since: datetime, until: datetime, lines: Sequence[str] | None = None) -> None:
    """1-minute defect_rates (line, camera and class scopes) from the inspections in [since, until),
    as the stream processors would write them (idempotent upserts)."""
    since = since.replace(second=0, microsecond=0)  # whole windows only: a window is rewritten in full
    if until != until.replace(second=0, microsecond=0):
        until = until.replace(second=0, microsecond=0) + timedelta(minutes=1)
    line_clause = " AND i.line_id = ANY(%(lines)s)" if lines else ""
    params = {"since": since, "until": until, "lines": list(lines or [])}
    upsert = (" ON CONFLICT (line_id, camera_id, class_name, window_s, window_start) DO UPDATE SET"
              " frames = EXCLUDED.frames, fails = EXCLUDED.fails, defects = EXCLUDED.defects,"
              " p95_latency_ms = EXCLUDED.p95_latency_ms, updated_at = now()")
    for cam_expr in ("''", "i.camera_id"):
        conn.execute(
            "INSERT INTO defect_rates (window_start, window_s, line_id, camera_id, class_name, frames, fails, defects,"
            " p95_latency_ms) SELECT date_trunc('minute', i.captured_at), 60, i.line_id, " + cam_expr + ", '',"
            " count(*), count(*) FILTER (WHERE i.verdict = 'FAIL'), sum(i.n_defects),"
            " percentile_cont(0.95) WITHIN GROUP (ORDER BY i.total_ms)"
            " FROM inspections i WHERE i.captured_at >= %(since)s AND i.captured_at < %(until)s" + line_clause +
            " GROUP BY 1, 3, 4" + upsert, params)  # type: ignore[arg-type]
    conn.execute(
        "INSERT INTO defect_rates (window_start, window_s, line_id, camera_id, class_name, frames, fails, defects)"
        " SELECT w.window_start, 60, w.line_id, '', c.class_name, w.frames, count(DISTINCT c.frame_id), count(c.frame_id)"
        " FROM (SELECT date_trunc('minute', i.captured_at) AS window_start, i.line_id, count(*) AS frames"
        "       FROM inspections i WHERE i.captured_at >= %(since)s AND i.captured_at < %(until)s" + line_clause +
        "       GROUP BY 1, 2) w"
        " JOIN (SELECT date_trunc('minute', i.captured_at) AS window_start, i.line_id, d.class_name, d.frame_id"
        "       FROM inspections i JOIN defects d ON d.frame_id = i.frame_id"
        "       WHERE i.captured_at >= %(since)s AND i.captured_at < %(until)s" + line_clause + ") c"
        "   ON c.window_start = w.window_start AND c.line_id = w.line_id"
        " GROUP BY w.window_start, w.line_id, c.class_name, w.frames"
        " ON CONFLICT (line_id, camera_id, class_name, window_s, window_start) DO UPDATE SET"
        " frames = EXCLUDED.frames, fails = EXCLUDED.fails, defects = EXCLUDED.defects, updated_at = now()",
        params)  # type: ignore[arg-type]


def fill_bench(conn: Connection[Any], rows: int, *, lines: int = 4, cameras: int = 4, days: float = 7.0,
               fail_rate: float = 0.08, now: datetime | None = None) -> dict[str, int]:
    """N synthetic inspections spread over ``days`` up to now (server-side generate_series), defects
    for the FAILs, the 1-minute rates from them, baselines, alerts and part verdicts."""
    now = now or datetime.now(UTC)
    span_s = days * 86400.0
    p = {"n": rows, "lines": lines, "cams": cameras, "span": span_s, "now": now, "fr": fail_rate}
    conn.execute(
        "INSERT INTO inspections (frame_id, line_id, camera_id, seq, part_id, captured_at, inspected_at, image_uri,"
        " width, height, model_name, model_version, verdict, n_defects, thresholds, timings, total_ms, batch_size,"
        " worker_id)"
        " SELECT gen_random_uuid(), 'line-' || (mod(g, %(lines)s) + 1), 'line-' || (mod(g, %(lines)s) + 1) || '-cam-' ||"
        "  (mod(g / %(lines)s, %(cams)s) + 1), g, 'part-' || (g / (%(lines)s * %(cams)s)),"
        "  t, t + interval '40 ms', 'file:///bench/' || g || '.jpg', 320, 320, 'bench-model', '1',"
        "  CASE WHEN f THEN 'FAIL' ELSE 'PASS' END, CASE WHEN f THEN 1 ELSE 0 END,"
        "  '{\"default_score\": 0.25, \"iou\": 0.45}', '{\"total_ms\": 30}', 30, 4, 'bench-' || mod(g, 4)"
        " FROM (SELECT g, %(now)s::timestamptz - make_interval(secs => %(span)s * (1 - g::float8 / %(n)s)) AS t,"
        "       random() < %(fr)s AS f FROM generate_series(1, %(n)s) AS g) s",
        p)
    conn.execute(
        "INSERT INTO defects (frame_id, idx, class_id, class_name, score, x1, y1, x2, y2)"
        " SELECT frame_id, 0, mod(seq, 3)::int, (ARRAY['scratch','dent','spot'])[mod(seq, 3) + 1], 0.6, 10, 10, 60, 60"
        " FROM inspections WHERE verdict = 'FAIL'")
    aggregate_rates(conn, now - timedelta(seconds=span_s + 60), now + timedelta(minutes=1))
    conn.execute("INSERT INTO spc_baselines (line_id, class_name, p_bar, frames, fails, since, until)"
                 " SELECT line_id, '', %(fr)s, 100000, 8000, now() - interval '8 days', now() - interval '7 days'"
                 " FROM (SELECT DISTINCT line_id FROM defect_rates) l", p)
    conn.execute(
        "INSERT INTO alerts (alert_id, kind, rule, state, line_id, window_start, window_end, value, center, ucl,"
        " message, opened_at)"
        " SELECT 'bench-' || g, 'spc', 'we1_beyond_3sigma', (ARRAY['open','acknowledged','resolved'])[mod(g, 3) + 1],"
        "  'line-' || (mod(g, %(lines)s) + 1), date_trunc('minute', t), date_trunc('minute', t) + interval '1 minute',"
        "  0.3, %(fr)s, 0.2, 'bench alert', t"
        " FROM (SELECT g, %(now)s::timestamptz - make_interval(secs => %(span)s * random()) AS t"
        "       FROM generate_series(1, 2000) g) s", p)
    conn.execute(
        "INSERT INTO part_verdicts (part_id, line_id, verdict, expected_views, views, missing_cameras, first_seen_at,"
        " decided_at) SELECT 'bench-part-' || g, 'line-' || (mod(g, %(lines)s) + 1),"
        "  (ARRAY['OK','OK','OK','OK','NG','INCOMPLETE'])[mod(g, 6) + 1], %(cams)s, '[]', '{}', t, t + interval '2 s'"
        " FROM (SELECT g, %(now)s::timestamptz - make_interval(secs => %(span)s * (1 - g::float8 / (%(n)s / %(cams)s)))"
        "       AS t FROM generate_series(1, greatest(1, %(n)s / %(cams)s)) g) s", p)
    conn.execute("VACUUM ANALYZE")  # what autovacuum does on a live database: index-only scans work
    counts = {}
    for t in ("inspections", "defects", "defect_rates", "alerts", "part_verdicts"):
        counts[t] = int(conn.execute("SELECT count(*) FROM " + t).fetchone()[0])  # type: ignore[index,operator]
    return counts
