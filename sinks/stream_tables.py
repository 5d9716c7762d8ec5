"""defect-rates, alerts, part-verdicts and frames.dlq topics -> PostgreSQL (migrations 002 and 005).

Idempotent like the inspections sink: upserts keyed by each table's natural key, one transaction per
batch, offsets committed only after it. A redelivered window never shrinks a row (the larger count
wins, so a replay after a restart cannot overwrite a full window with a partial one); an alert never
goes back from resolved, and an acknowledgement made on the dashboard survives later updates.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from infra.consume_loop import ConsumeLoop, RetryLater
from infra.db import connect
from infra.kafka import Message
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import source_label
from schemas.serde import SchemaError, deserialize

log = logging.getLogger(__name__)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def ts(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + timedelta(microseconds=int(us))


RATES_UPSERT = """
INSERT INTO defect_rates (window_start, window_s, line_id, camera_id, class_name, frames, fails, defects, late,
                          p95_latency_ms, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (line_id, camera_id, class_name, window_s, window_start) DO UPDATE SET
    frames = EXCLUDED.frames, fails = EXCLUDED.fails, defects = EXCLUDED.defects, late = EXCLUDED.late,
    p95_latency_ms = EXCLUDED.p95_latency_ms, updated_at = now()
WHERE (EXCLUDED.frames, EXCLUDED.fails) >= (defect_rates.frames, defect_rates.fails)
"""

ALERTS_UPSERT = """
INSERT INTO alerts (alert_id, kind, rule, severity, state, line_id, camera_id, class_name, window_start, window_end,
                    value, center, lcl, ucl, message, details, example_frame_ids, opened_at, updated_at,
                    resolved_at, fired)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (alert_id) DO UPDATE SET
    state = CASE WHEN alerts.state = 'resolved' THEN 'resolved'
                 WHEN EXCLUDED.state = 'resolved' THEN 'resolved'
                 ELSE alerts.state END,      -- 'acknowledged' is set by people, never undone by the stream
    window_end = GREATEST(alerts.window_end, EXCLUDED.window_end),
    value = EXCLUDED.value, message = EXCLUDED.message, details = EXCLUDED.details,
    example_frame_ids = EXCLUDED.example_frame_ids,
    resolved_at = COALESCE(alerts.resolved_at, EXCLUDED.resolved_at),
    fired = GREATEST(alerts.fired, EXCLUDED.fired), updated_at = now()
WHERE EXCLUDED.fired >= alerts.fired OR EXCLUDED.state = 'resolved'
"""

PARTS_UPSERT = """
INSERT INTO part_verdicts (part_id, line_id, verdict, expected_views, views, missing_cameras, worst_class,
                           worst_score, worst_camera, reason, first_seen_at, decided_at, updated_at)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, now())
ON CONFLICT (part_id) DO UPDATE SET
    line_id = EXCLUDED.line_id, verdict = EXCLUDED.verdict, expected_views = EXCLUDED.expected_views,
    views = EXCLUDED.views, missing_cameras = EXCLUDED.missing_cameras, worst_class = EXCLUDED.worst_class,
    worst_score = EXCLUDED.worst_score, worst_camera = EXCLUDED.worst_camera, reason = EXCLUDED.reason,
    first_seen_at = EXCLUDED.first_seen_at, decided_at = EXCLUDED.decided_at, updated_at = now()
WHERE part_verdicts.decided_at <= EXCLUDED.decided_at
"""


DLQ_UPSERT = """
INSERT INTO dead_letters (source_topic, source_partition, source_offset, frame_id, line_id, camera_id, error_type,
                          error_message, failed_at, worker_id, original_size)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (source_topic, source_partition, source_offset) DO NOTHING
"""


def dead_letter_row(d: dict[str, Any]) -> tuple[Any, ...]:
    """A frames.dlq record as a row; line and camera from the original FrameRef when it decodes."""
    line_id = camera_id = None
    if d.get("original_value"):
        try:
            ref = deserialize("frame_ref", d["original_value"], list((d.get("original_headers") or {}).items()))
            line_id, camera_id = ref.get("line_id"), ref.get("camera_id")
        except (SchemaError, KeyError, ValueError):
            pass  # undecodable or truncated original: the row still counts, without a line
    size = d.get("original_size")
    if size is None and d.get("original_value") is not None:
        size = len(d["original_value"])
    return (d["source_topic"], d["source_partition"], d["source_offset"], d.get("frame_id"), line_id, camera_id,
            d["error_type"], d["error_message"][:2000], ts(d["failed_at"]), d["worker_id"], size)


def rate_row(r: dict[str, Any]) -> tuple[Any, ...]:
    return (ts(r["window_start"]), r["window_s"], r["line_id"], r["camera_id"], r["class_name"], r["frames"],
            r["fails"], r["defects"], r["late"], r["p95_latency_ms"])


def alert_row(a: dict[str, Any]) -> tuple[Any, ...]:
    return (a["alert_id"], a["kind"], a["rule"], a["severity"], a["state"], a["line_id"], a["camera_id"],
            a["class_name"], ts(a["window_start"]), ts(a["window_end"]), a["value"], a["center"], a["lcl"], a["ucl"],
            a["message"], a["details_json"], a["example_frame_ids"], ts(a["opened_at"]), ts(a["updated_at"]),
            ts(a["resolved_at"]), a["fired"])


def part_row(p: dict[str, Any]) -> tuple[Any, ...]:
    return (p["part_id"], p["line_id"], p["verdict"], p["expected_views"], json.dumps(p["views"]),
            p["missing_cameras"], p["worst_class"], p["worst_score"], p["worst_camera"], p["reason"],
            ts(p["first_seen_at"]), ts(p["decided_at"]))


@dataclass
class StreamSinkStats:
    rates: int = 0
    alerts: int = 0
    parts: int = 0
    dead_letters: int = 0
    undecodable: int = 0
    batches: int = 0


class StreamTablesSink:
    """Consumes the three stream topics and frames.dlq (group ``sink-stream-tables``) into PostgreSQL."""

    def __init__(self, settings: Settings, *, group_id: str = "sink-stream-tables", dsn: str | None = None,
                 db_retries: int = 3, max_backoff_s: float = 30.0) -> None:
        cat = TopicCatalog(settings.topic_prefix)
        self.topics = {cat.defect_rates: ("defect_rate", RATES_UPSERT, rate_row, "rates"),
                       cat.alerts: ("alert", ALERTS_UPSERT, alert_row, "alerts"),
                       cat.part_verdicts: ("part_verdict", PARTS_UPSERT, part_row, "parts"),
                       cat.frames_dlq: ("frame_dlq", DLQ_UPSERT, dead_letter_row, "dead_letters")}
        self.dsn = dsn or settings.dsn()
        self.db_retries = db_retries
        self.stats = StreamSinkStats()
        self._conn: psycopg.Connection[Any] | None = None
        # a database outage pauses the loop (rewind, backoff, probe) instead of ending the process
        self.loop = ConsumeLoop(settings, topics=list(self.topics), group_id=group_id,
                                client_id=f"{group_id}-{uuid.uuid4().hex[:6]}", on_batch=self._batch,
                                with_producer=False, probe=self._probe, name="sink stream-tables",
                                max_backoff_s=max_backoff_s)

    def stop(self) -> None:
        self.loop.stop()

    def run(self, max_idle_s: float | None = None) -> StreamSinkStats:
        try:
            self.loop.run(max_idle_s=max_idle_s)
        finally:
            if self._conn is not None:
                self._conn.close()
        return self.stats

    def _batch(self, msgs: list[Message], _loop: Any) -> None:
        rows: dict[str, list[tuple[Any, ...]]] = {}
        for m in msgs:
            schema, sql, to_row, _ = self.topics[m.topic()]
            try:
                rows.setdefault(m.topic(), []).append(to_row(deserialize(schema, m.value(), m.headers())))
            except (SchemaError, KeyError) as exc:
                self.stats.undecodable += 1
                log.warning("undecodable record skipped", extra={
                    "at": source_label(m.topic(), m.partition(), m.offset()), "error": str(exc)})
        delay = 0.2
        for attempt in range(1, self.db_retries + 1):
            try:
                self._write(rows)
                break
            except psycopg.OperationalError as exc:
                log.debug("database write failed", extra={"attempt": attempt, "error": str(exc)})
                self._close_conn()
                if attempt == self.db_retries:
                    raise RetryLater(f"PostgreSQL write failed ({' '.join(str(exc).split())[:200]})") from None
                time.sleep(delay)
                delay *= 2

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _probe(self) -> None:
        """Before a paused loop retries: is PostgreSQL back? (raises while it is not)"""
        try:
            if self._conn is None or self._conn.closed:
                self._conn = connect(self.dsn, connect_timeout=5)
            self._conn.execute("SELECT 1")
            self._conn.rollback()
        except psycopg.Error:
            self._close_conn()
            raise

    def _write(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.dsn)
        with self._conn.transaction(), self._conn.cursor() as cur:
            for topic, batch in rows.items():
                _, sql, _, stat = self.topics[topic]
                cur.executemany(sql, batch)
                setattr(self.stats, stat, getattr(self.stats, stat) + len(batch))
        self.stats.batches += 1
