"""Inspections topic -> PostgreSQL, effectively once: idempotent upserts keyed by frame_id.

A batch (max rows / max wait) is written in one transaction (COPY into a temp table, one upsert,
the frames' defects replaced); only then, and once its dead letters are acknowledged, are its offsets
stored (committed on an interval by infra.consume_loop, which also pauses, rewinds and retries a batch
when PostgreSQL or the DLQ delivery fails). Undecodable records go to the DLQ with their original
bytes and never block a partition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from infra.consume_loop import ConsumeLoop, RetryLater
from infra.db import MigrationError, check_schema, connect_writer
from infra.kafka import Message, TopicPartition
from infra.metrics import END_TO_END_MS, FRAME_STAGE_MS, SINK_DLQ, SINK_RETRIES, SINK_ROWS, SINK_WRITE_MS
from infra.review_queue import ReviewItem, Sampler, SampleResult, item_from_record
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import dead_letter, source_label
from schemas.serde import deserialize
from sinks.errors import RecordError, SinkError

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

INSPECTION_COLS = (
    "frame_id", "line_id", "camera_id", "seq", "part_id", "captured_at", "inspected_at", "image_uri",
    "width", "height", "model_name", "model_version", "verdict", "n_defects", "thresholds", "timings",
    "total_ms", "batch_size", "worker_id", "source_partition", "source_offset",
    "mask_uri", "segmenter", "verdict_rules",  # 004_segmentation
)
DEFECT_COLS = ("frame_id", "idx", "class_id", "class_name", "score", "x1", "y1", "x2", "y2",
               "mask_rle", "mask_area", "polygon", "area_mm2", "length_mm")

_STAGE = "sink_inspections_stage"
_UPSERT = (
    f"INSERT INTO inspections ({', '.join(INSPECTION_COLS)}) "
    f"SELECT {', '.join(INSPECTION_COLS)} FROM {_STAGE} "
    "ON CONFLICT (frame_id) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in INSPECTION_COLS if c != "frame_id")
    + ", written_at = now() "
    # MES contract (docs/DESIGN.md "Duplicates"): of two inspections of one frame the one with the
    # greater (inspected_at, worker_id, model_version) wins, whatever order they arrive in
    # (text compared byte-wise, COLLATE "C", like Python's str order)
    'WHERE (inspections.inspected_at, inspections.worker_id COLLATE "C", inspections.model_version COLLATE "C") '
    '<= (EXCLUDED.inspected_at, EXCLUDED.worker_id COLLATE "C", EXCLUDED.model_version COLLATE "C") '
    "RETURNING frame_id"
)


def winner_key(rec: dict[str, Any]) -> tuple[int, str, str]:
    """The order that decides which of several inspections of one frame_id is kept (highest wins).

    The contract for every consumer of the inspections topic (MES included): dedupe by frame_id and
    keep the record with the greatest (inspected_at, worker_id, model_version); PostgreSQL applies
    the same rule (see _UPSERT), so the database and a topic consumer always agree.
    """
    return (int(rec["inspected_at"]), str(rec["worker_id"]), str(rec["model_version"]))


# positions of the winner_key columns in an inspections row (INSPECTION_COLS)
_ROW_KEY = (INSPECTION_COLS.index("inspected_at"), INSPECTION_COLS.index("worker_id"),
            INSPECTION_COLS.index("model_version"))


def _ts(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=int(us))


def _f32(x: Any) -> Any:
    """An Avro float as the short decimal it was written from (0.45, not 0.44999998807907104)."""
    return float(f"{x:.7g}") if isinstance(x, float) else x


def to_rows(rec: dict[str, Any]) -> tuple[tuple[Any, ...], list[tuple[Any, ...]]]:
    """An Inspection record -> (inspections row, defects rows), columns as INSPECTION_COLS / DEFECT_COLS."""
    try:
        fid = uuid.UUID(rec["frame_id"])
    except (ValueError, TypeError, AttributeError) as exc:
        raise RecordError(f"frame_id {rec.get('frame_id')!r} is not a UUID") from exc
    dets = rec["detections"]
    if len(dets) > 32767:
        raise RecordError(f"{len(dets)} detections exceed the defects index range")
    timings = {k: _f32(v) for k, v in rec["timings"].items()}
    th = rec["thresholds"]
    thresholds = {"default_score": _f32(th["default_score"]), "iou": _f32(th["iou"]),
                  "per_class": {k: _f32(v) for k, v in th.get("per_class", {}).items()}}
    row = (
        fid, rec["line_id"], rec["camera_id"], rec["seq"], rec.get("part_id"), _ts(rec["captured_at"]),
        _ts(rec["inspected_at"]), rec["image_uri"], rec["width"], rec["height"], rec["model_name"],
        rec["model_version"], rec["verdict"], len(dets), json.dumps(thresholds), json.dumps(timings),
        timings.get("total_ms"), rec["batch_size"], rec["worker_id"], rec["source_partition"],
        rec["source_offset"], rec.get("mask_uri"), rec.get("segmenter"), list(rec.get("verdict_rules") or []),
    )
    defects = []
    for i, d in enumerate(dets):
        mask = d.get("mask")
        rle = json.dumps({"height": mask["height"], "width": mask["width"], "counts": mask["counts"]}) if mask else None
        defects.append((fid, i, d["class_id"], d["class_name"], d["score"], d["x1"], d["y1"], d["x2"], d["y2"],
                        rle, mask["area"] if mask else None, [_f32(v) for v in d.get("polygon") or []] or None,
                        _f32(d.get("area_mm2")), _f32(d.get("length_mm"))))
    return row, defects


@dataclass
class SinkStats:
    """Counters of one sink process (read by tests and the CLI's periodic log line)."""

    messages: int = 0  # records consumed (including dead-lettered ones; a replayed batch counts again)
    rows_written: int = 0  # inspections inserted or updated
    rows_skipped: int = 0  # older redeliveries that left a newer row in place
    defects_written: int = 0
    batches: int = 0
    dead_lettered: int = 0
    errors: int = 0  # decode failures + failed database attempts
    commits: int = 0
    outages: int = 0  # times the sink paused because PostgreSQL or the DLQ delivery failed
    paused_s: float = 0.0  # time spent paused in those outages
    delivery_failures: int = 0  # dead letters the broker did not take
    review_queued: int = 0  # marked frames queued for review (review_queue)

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class PostgresSink:
    """Consumes Inspections (group ``sink-postgres``) and upserts them into PostgreSQL."""

    def __init__(self, settings: Settings, *, group_id: str = "sink-postgres", batch_size: int = 500,
                 max_wait_ms: int = 500, client_id: str | None = None, dsn: str | None = None,
                 db_retries: int = 2, statement_timeout_ms: int | None = None, startup_wait_s: float = 30.0,
                 max_backoff_s: float = 30.0) -> None:
        self.settings = settings
        self.catalog = TopicCatalog(settings.topic_prefix)
        self.topic = self.catalog.inspections
        self.group_id = group_id
        self.client_id = client_id or f"sink-postgres-{uuid.uuid4().hex[:6]}"
        self.dsn = dsn or settings.dsn()
        self.db_retries = max(1, db_retries)
        # None: the settings' pg_statement_timeout_ms (SQIS_PG_STATEMENT_TIMEOUT_MS, 30 s by default)
        self.statement_timeout_ms = settings.pg_statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
        self.startup_wait_s = startup_wait_s
        self.max_backoff_s = max_backoff_s
        self._stats = SinkStats()
        # active learning: frames the worker marked (sqis-review header) are sampled into review_queue in the
        # transaction that writes them (infra/review_queue.py: per-line rate and durable per-hour cap)
        self.sampler = Sampler.from_settings(settings, queued_by=self.client_id)
        self._reviews: dict[uuid.UUID, ReviewItem] = {}  # the current batch's marked frames
        self.stop_event = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._db_down = False  # the last outage was PostgreSQL's: probe it before retrying
        self.assigned: set[tuple[str, int]] = set()  # partitions this sink owns now
        self.loop = ConsumeLoop(
            settings, topics=[self.topic], group_id=group_id, client_id=self.client_id, on_batch=self._batch,
            batch_size=batch_size, max_wait_s=max(0, max_wait_ms) / 1000, poll_s=1.0, stop_event=self.stop_event,
            on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_revoke, probe=self._probe,
            max_backoff_s=max_backoff_s, producer_client_id=f"{self.client_id}-dlq", name="sink postgres",
            consumer_config={"queued.max.messages.kbytes": 16384})

    @property
    def stats(self) -> SinkStats:
        """The sink's counters with the consume loop's (commits, outages, paused time) folded in."""
        ls = self.loop.stats
        st = self._stats
        st.commits, st.outages, st.paused_s = ls.commits, ls.outages, round(ls.paused_s, 3)
        st.messages, st.batches, st.delivery_failures = ls.consumed, ls.batches, ls.delivery_failures
        return st

    @property
    def last_poll(self) -> float:
        return self.loop.last_poll

    @property
    def ready(self) -> bool:
        return self.loop.consumer is not None

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish: write the gathered batch, commit, close."""
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT only set the stop event (call from the main thread)."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop_event.set())

    def run(self, max_messages: int | None = None, idle_timeout_s: float | None = None) -> SinkStats:
        """Consume until stopped, ``max_messages`` consumed, or nothing arrived for ``idle_timeout_s``.

        At start an unreachable broker or database is waited for up to ``startup_wait_s`` (one warning,
        quiet retries), then SinkError; a database older than this build is refused at start. Once
        running, a database or DLQ outage pauses the partitions, rewinds them to the unwritten batch and
        retries with backoff (infra.consume_loop): no exit, no busy loop, no growth.
        """
        self._wait_for_dependencies()
        try:
            check_schema(self.dsn, role="sink postgres")
        except (MigrationError, psycopg.Error) as exc:
            raise SinkError(str(exc).strip()) from exc
        try:
            self.loop.run(max_idle_s=idle_timeout_s, max_messages=max_messages)
        finally:
            self._close_conn()
        log.info("sink stopped", extra=self.stats.as_dict())
        return self.stats

    def _wait_for_dependencies(self) -> None:
        from infra.kafka import BrokerUnavailable, wait_for_broker

        try:
            wait_for_broker(self.settings, self.startup_wait_s, stop=self.stop_event)
        except BrokerUnavailable as exc:
            raise SinkError(str(exc)) from None
        deadline = time.monotonic() + self.startup_wait_s
        delay, warned = 1.0, False
        while True:
            try:
                self._connection()
                return
            except psycopg.Error as exc:
                why = " ".join(str(exc).split())[:300]
                if time.monotonic() + delay > deadline or self.stop_event.is_set():
                    raise SinkError(f"PostgreSQL is unreachable: {why}; check SQIS_POSTGRES_DSN "
                                    "or `sqis stack status`") from None
                if not warned and self.startup_wait_s > 5:  # a short wait ends in the one error line
                    log.warning("PostgreSQL unreachable, retrying with backoff",
                                extra={"error": why, "max_wait_s": self.startup_wait_s})
                    warned = True
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)

    def _probe(self) -> None:
        """Before a paused sink retries: is PostgreSQL back? (raises while it is not)"""
        if not self._db_down:
            return
        try:
            conn = self._connection()
            conn.execute("SELECT 1")
            conn.rollback()
        except psycopg.Error:
            self._close_conn()
            raise
        self._db_down = False

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    # -- a batch ---------------------------------------------------------------------------------

    def _batch(self, msgs: list[Message], loop: ConsumeLoop) -> None:
        """Decode, dead-letter what cannot be written, upsert the rest in one transaction. RetryLater
        when PostgreSQL fails after retries (the loop rewinds, pauses and retries the batch)."""
        rows: dict[uuid.UUID, tuple[tuple[Any, ...], list[tuple[Any, ...]]]] = {}
        sources: dict[uuid.UUID, Message] = {}
        reviews: dict[uuid.UUID, ReviewItem | None] = {}
        for msg in msgs:
            where = source_label(msg.topic(), msg.partition(), msg.offset())
            try:
                rec = deserialize("inspection", msg.value(), msg.headers())
                row, defects = to_rows(rec)
            except Exception as exc:  # SchemaError, RecordError, a missing field: all go to the DLQ
                self._stats.errors += 1
                log.warning("undecodable inspection, dead-lettering", extra={"at": where, "error": str(exc)})
                self._dead_letter(loop, msg, exc, reason="undecodable")
                continue
            fid = row[0]
            old = rows.get(fid)
            if old is None or tuple(old[0][i] for i in _ROW_KEY) <= tuple(row[i] for i in _ROW_KEY):  # winner_key
                rows[fid] = (row, defects)
                sources[fid] = msg
                reviews[fid] = item_from_record(rec, msg.headers())
        self._reviews = {k: v for k, v in reviews.items() if v is not None}
        if rows:
            self._write_with_retries(loop, rows, sources)
        log.debug("batch written", extra={"messages": len(msgs), "rows": len(rows)})

    def _dead_letter(self, loop: ConsumeLoop, msg: Message, exc: Exception, frame_id: str | None = None,
                     reason: str = "refused") -> None:
        value, headers = dead_letter(
            source_topic=msg.topic(), source_partition=msg.partition(), source_offset=msg.offset(), key=msg.key(),
            value=msg.value(), headers=msg.headers(), error_type=type(exc).__name__, error_message=str(exc),
            worker_id=self.client_id, frame_id=frame_id)
        # acknowledged before the batch's offsets move (the loop flushes and checks every delivery)
        loop.produce(self.catalog.frames_dlq, msg.key(), value, headers,
                     where=source_label(msg.topic(), msg.partition(), msg.offset()),
                     on_delivered=lambda: self._dead_lettered(reason))

    def _dead_lettered(self, reason: str) -> None:
        """Counted once the broker has it, not per attempt."""
        self._stats.dead_lettered += 1
        SINK_DLQ.labels("postgres", reason).inc()

    # -- writing ---------------------------------------------------------------------------------

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            # a query stuck on a lock or a sick server fails (and is retried) instead of hanging the sink
            self._conn = connect_writer(self.dsn, statement_timeout_ms=self.statement_timeout_ms,
                                        lock_timeout_ms=self.settings.pg_lock_timeout_ms, connect_timeout=5)
            self._conn.execute(
                f"CREATE TEMP TABLE IF NOT EXISTS {_STAGE} "
                "(LIKE inspections INCLUDING DEFAULTS) ON COMMIT DELETE ROWS")
            self._conn.commit()
        return self._conn

    def _write_with_retries(self, loop: ConsumeLoop, rows: dict[uuid.UUID, Any], sources: dict[uuid.UUID, Message]) -> None:
        delay = 0.2
        for attempt in range(1, self.db_retries + 1):
            try:
                t0 = time.perf_counter()
                self._write(list(rows.values()))
                SINK_WRITE_MS.labels("postgres").observe((time.perf_counter() - t0) * 1000)
                return
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                # a row the database refuses: isolate it rather than retry the whole batch forever
                self._stats.errors += 1
                log.warning("batch refused, writing rows one by one", extra={"error": str(exc)})
                self._write_one_by_one(loop, rows, sources)
                return
            except psycopg.Error as exc:
                self._stats.errors += 1
                log.debug("database write failed", extra={"attempt": attempt, "error": str(exc)})
                self._close_conn()
                if attempt == self.db_retries:
                    self._db_down = True
                    raise RetryLater(f"PostgreSQL write failed ({' '.join(str(exc).split())[:200]})") from None
                SINK_RETRIES.labels("postgres").inc()
                time.sleep(delay)
                delay *= 2

    def _write_one_by_one(self, loop: ConsumeLoop, rows: dict[uuid.UUID, Any], sources: dict[uuid.UUID, Message]) -> None:
        self._rollback()
        for fid, item in rows.items():
            try:
                self._write([item])
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                self._rollback()
                self._dead_letter(loop, sources[fid], exc, frame_id=str(fid))

    def _rollback(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.rollback()

    def _write(self, items: list[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> None:
        conn = self._connection()
        reviews = self._reviews
        sampled: SampleResult | None = None
        with conn.transaction(), conn.cursor() as cur:
            with cur.copy(f"COPY {_STAGE} ({', '.join(INSPECTION_COLS)}) FROM STDIN") as copy:
                for row, _ in items:
                    copy.write_row(row)
            cur.execute(_UPSERT)
            written = {r[0] for r in cur.fetchall()}
            if written:
                cur.execute("DELETE FROM defects WHERE frame_id = ANY(%s)", (list(written),))
                n = 0
                with cur.copy(f"COPY defects ({', '.join(DEFECT_COLS)}) FROM STDIN") as copy:
                    for row, defects in items:
                        if row[0] in written:
                            for d in defects:
                                copy.write_row(d)
                                n += 1
                self._stats.defects_written += n
            marked = [reviews[row[0]] for row, _ in items if row[0] in written and row[0] in reviews]  # topic order
            if marked:
                sampled = self.sampler.offer(conn, marked, defer_metrics=True)
        if sampled is not None:  # counted once the transaction committed, like the rows
            self._stats.review_queued += sampled.queued
            sampled.count_metrics()
        now = datetime.now(UTC)
        for row, _ in items:  # counted once the transaction committed
            if row[0] in written:
                SINK_ROWS.labels("postgres", row[1], row[12]).inc()
                END_TO_END_MS.labels("postgres").observe(max(0.0, (now - row[5]).total_seconds() * 1000))
                for stage, ms in json.loads(row[15]).items():
                    if isinstance(ms, int | float):
                        FRAME_STAGE_MS.labels(stage.removesuffix("_ms")).observe(ms)
        self._stats.rows_written += len(written)
        self._stats.rows_skipped += len(items) - len(written)

    # -- rebalance -------------------------------------------------------------------------------

    def _on_assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}

    def _on_revoke(self, partitions: list[TopicPartition]) -> None:
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}

