"""Inspections topic -> PostgreSQL, effectively once: idempotent upserts keyed by frame_id.

A batch (max rows / max wait) is written in one transaction (COPY into a temp table, one upsert,
the frames' defects replaced); only then are its offsets stored and committed synchronously.
Undecodable records go to the DLQ with their original bytes and never block a partition.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from infra.db import MigrationError, check_schema, connect_writer
from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.kafka import consumer as make_consumer
from infra.kafka import producer as make_producer
from infra.metrics import END_TO_END_MS, FRAME_STAGE_MS, SINK_DLQ, SINK_RETRIES, SINK_ROWS, SINK_WRITE_MS
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import dead_letter, source_label
from schemas.serde import deserialize

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


class SinkError(RuntimeError):
    """The sink cannot make progress (database or Kafka failure after retries)."""


class _Outage(Exception):
    """PostgreSQL (or the DLQ delivery) failed in a way that waiting can fix: pause, rewind, retry."""


class RecordError(ValueError):
    """One record cannot be turned into rows (carries the reason for the DLQ)."""


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

    messages: int = 0  # records consumed (including dead-lettered ones)
    rows_written: int = 0  # inspections inserted or updated
    rows_skipped: int = 0  # older redeliveries that left a newer row in place
    defects_written: int = 0
    batches: int = 0
    dead_lettered: int = 0
    errors: int = 0  # decode failures + failed database attempts
    commits: int = 0
    outages: int = 0  # times the sink paused because PostgreSQL or the DLQ delivery failed
    paused_s: float = 0.0  # time spent paused in those outages

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


@dataclass
class _Pending:
    rows: dict[uuid.UUID, tuple[tuple[Any, ...], list[tuple[Any, ...]]]] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # next offset to commit
    first: dict[tuple[str, int], int] = field(default_factory=dict)  # first offset of the batch (rewind)
    msgs: dict[uuid.UUID, Message] = field(default_factory=dict)
    count: int = 0
    started: float = 0.0


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
        self.batch_size = max(1, batch_size)
        self.max_wait_s = max(0, max_wait_ms) / 1000
        self.client_id = client_id or f"sink-postgres-{uuid.uuid4().hex[:6]}"
        self.dsn = dsn or settings.dsn()
        self.db_retries = max(1, db_retries)
        # None: the settings' pg_statement_timeout_ms (SQIS_PG_STATEMENT_TIMEOUT_MS, 30 s by default)
        self.statement_timeout_ms = settings.pg_statement_timeout_ms if statement_timeout_ms is None else statement_timeout_ms
        self.startup_wait_s = startup_wait_s
        self.max_backoff_s = max_backoff_s
        self._outage: str | None = None  # why the sink is paused (None: running)
        self._outage_since = 0.0
        # resumed after an outage, but no batch committed yet: a failure now continues that outage
        # (no new warning, the backoff keeps growing) instead of starting a new one every retry
        self._trial = False
        self._retry_at = 0.0
        self._backoff = 0.0
        self.stats = SinkStats()
        self.stop_event = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._consumer: Any = None
        self._producer: Any = None
        self._pending = _Pending()
        self._dlq_failed: list[str] = []
        self.last_poll = time.monotonic()  # liveness: the loop is turning
        self.assigned: set[tuple[str, int]] = set()  # partitions this sink owns now

    # -- lifecycle -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to finish: flush the pending batch, commit, close."""
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
        retries with backoff: no exit, no busy loop, no growth.
        """
        self._wait_for_dependencies()
        try:
            check_schema(self.dsn, role="sink postgres")
        except (MigrationError, psycopg.Error) as exc:
            raise SinkError(str(exc).strip()) from exc
        self._consumer = make_consumer(self.settings, group_id=self.group_id, client_id=self.client_id,
                                       **{"enable.auto.commit": False, "queued.max.messages.kbytes": 16384})
        self._producer = make_producer(self.settings, client_id=f"{self.client_id}-dlq")
        self._consumer.subscribe([self.topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        log.info("sink started", extra={"topic": self.topic, "group": self.group_id, "client": self.client_id})
        last_msg = time.monotonic()
        clean = False
        try:
            while not self.stop_event.is_set():
                if max_messages is not None and self.stats.messages >= max_messages:
                    break
                if self._outage is not None:
                    self._outage_step(idle_timeout_s)
                    last_msg = time.monotonic()  # a paused sink is not idle
                    continue
                msg = self._consumer.poll(self._poll_timeout())
                now = self.last_poll = time.monotonic()
                if msg is None:
                    if self._pending.count and now - self._pending.started >= self.max_wait_s:
                        self._flush("max-wait")
                    if idle_timeout_s is not None and now - last_msg >= idle_timeout_s:
                        break
                    continue
                if msg.error():
                    self._on_kafka_error(msg.error())
                    continue
                last_msg = now
                self._add(msg)
                if self._pending.count >= self.batch_size or (
                        self._pending.count and now - self._pending.started >= self.max_wait_s):
                    self._flush("full" if self._pending.count >= self.batch_size else "max-wait")
            clean = True
        finally:
            try:
                if clean and self._outage is None:
                    self._flush("shutdown")
            finally:
                self._close()
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
                if not warned:
                    log.warning("PostgreSQL unreachable, retrying with backoff",
                                extra={"error": why, "max_wait_s": self.startup_wait_s})
                    warned = True
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.max_backoff_s)

    # -- outages: pause, rewind, retry ---------------------------------------------------------------

    def _enter_outage(self, why: str) -> None:
        """Give up the pending batch without committing: rewind its partitions and pause them all."""
        p, self._pending = self._pending, _Pending()
        self._dlq_failed = []
        for (topic, part), off in p.first.items():
            try:
                self._consumer.seek(TopicPartition(topic, part, off))
            except KafkaException as exc:  # revoked meanwhile: the new owner starts at the commit
                log.debug("rewind skipped", extra={"partition": part, "error": str(exc)})
        self._pause_all()
        now = time.monotonic()
        if self._outage is None and not self._trial:
            self._outage_since = now
            self.stats.outages += 1
            self._backoff = 1.0
            log.warning("sink paused: %s; retrying with backoff, nothing is committed meanwhile", why,
                        extra={"rewound": {k[1]: v for k, v in p.first.items()}})
        else:
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            log.debug("still failing", extra={"error": why, "next_try_s": self._backoff})
        self._trial = False
        self._outage = why
        self._retry_at = now + self._backoff

    def _pause_all(self) -> None:
        try:
            assigned = self._consumer.assignment()
            if assigned:
                self._consumer.pause(assigned)
        except KafkaException as exc:
            log.debug("pause failed", extra={"error": str(exc)})

    def _outage_step(self, idle_timeout_s: float | None) -> None:
        """One turn of the paused loop: poll (group membership, rebalances), retry when due."""
        msg = self._consumer.poll(min(1.0, max(0.05, self._retry_at - time.monotonic())))
        if msg is not None and not msg.error():
            # a newly assigned partition delivered before we paused it: put the message back
            tp = TopicPartition(msg.topic(), msg.partition(), msg.offset())
            with contextlib.suppress(KafkaException):
                self._consumer.seek(tp)
            self._pause_all()
        if time.monotonic() < self._retry_at:
            return
        try:
            if self._outage and self._outage.startswith("PostgreSQL"):
                conn = self._connection()
                conn.execute("SELECT 1")
                conn.rollback()
        except psycopg.Error as exc:
            self._close_conn()
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            self._retry_at = time.monotonic() + self._backoff
            log.debug("still unavailable", extra={"error": str(exc), "next_try_s": self._backoff})
            return
        # the rewound batch is tried again; the outage ends when it commits (see _end_trial)
        log.debug("retrying after outage", extra={"reason": self._outage})
        self._outage, self._trial = None, True
        with contextlib.suppress(KafkaException):
            assigned = self._consumer.assignment()
            if assigned:
                self._consumer.resume(assigned)

    def _end_trial(self) -> None:
        if self._trial:
            self._trial = False
            paused = time.monotonic() - self._outage_since
            self.stats.paused_s += paused
            log.info("sink resumed after %.1f s paused", paused)

    def _renew_producer(self) -> None:
        """A fresh DLQ producer after a failed delivery: an idempotent producer whose batch was
        refused can stay fenced for good (seen on the former local broker: every later produce PRODUCER_FENCED), and
        what it still holds would be sent again anyway when the batch is retried."""
        old, self._producer = self._producer, make_producer(self.settings, client_id=f"{self.client_id}-dlq")
        if old is not None:
            with contextlib.suppress(KafkaException, RuntimeError):
                old.purge()
                old.flush(0)
        self._dlq_failed = []

    def _close_conn(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def _poll_timeout(self) -> float:
        if not self._pending.count:
            return 1.0
        left = self.max_wait_s - (time.monotonic() - self._pending.started)
        return min(1.0, max(0.0, left))

    def _close(self) -> None:
        # after a failure the unwritten batch is abandoned (redelivered later); the final
        # rebalance inside close() must not try to write it again
        self._pending = _Pending()
        if self._producer is not None:
            self._producer.flush(10)
        if self._consumer is not None:
            try:
                self._consumer.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed", extra={"error": str(exc)})
        self._close_conn()
        self._consumer = self._producer = None

    # -- consuming -------------------------------------------------------------------------------

    def _on_kafka_error(self, err: KafkaError) -> None:
        from infra.kafka_security import denial, denied_message

        if denial(err):  # no credentials or ACL: one line and stop, never a retry storm
            resource = self.group_id if denial(err) == "group" else self.topic
            raise SinkError(denied_message(self.settings, err, resource))
        if err.fatal():
            raise SinkError(f"fatal Kafka error: {err}")
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka error", extra={"error": str(err)})

    def _add(self, msg: Message) -> None:
        p = self._pending
        if not p.count:
            p.started = time.monotonic()
        p.count += 1
        p.first.setdefault((msg.topic(), msg.partition()), msg.offset())
        self.stats.messages += 1
        where = source_label(msg.topic(), msg.partition(), msg.offset())
        try:
            rec = deserialize("inspection", msg.value(), msg.headers())
            row, defects = to_rows(rec)
        except Exception as exc:  # SchemaError, RecordError, a missing field: all go to the DLQ
            self.stats.errors += 1
            log.warning("undecodable inspection, dead-lettering", extra={"at": where, "error": str(exc)})
            self._dead_letter(msg, exc, reason="undecodable")
        else:
            fid = row[0]
            old = p.rows.get(fid)
            if old is None or tuple(old[0][i] for i in _ROW_KEY) <= tuple(row[i] for i in _ROW_KEY):  # winner_key
                p.rows[fid] = (row, defects)
                p.msgs[fid] = msg
        key = (msg.topic(), msg.partition())
        p.offsets[key] = max(p.offsets.get(key, -1), msg.offset() + 1)

    def _dead_letter(self, msg: Message, exc: Exception, frame_id: str | None = None,
                     reason: str = "refused") -> None:
        value, headers = dead_letter(
            source_topic=msg.topic(), source_partition=msg.partition(), source_offset=msg.offset(), key=msg.key(),
            value=msg.value(), headers=msg.headers(), error_type=type(exc).__name__, error_message=str(exc),
            worker_id=self.client_id, frame_id=frame_id)
        where = source_label(msg.topic(), msg.partition(), msg.offset())

        def on_delivery(err: KafkaError | None, _m: Message) -> None:
            if err is not None:
                self._dlq_failed.append(f"{where}: {err.str()} ({err.name()})")
            else:  # counted once the broker has it, not per attempt
                self.stats.dead_lettered += 1
                SINK_DLQ.labels("postgres", reason).inc()

        while True:
            try:
                self._producer.produce(self.catalog.frames_dlq, value=value, key=msg.key(), headers=headers,
                                       on_delivery=on_delivery)
                break
            except BufferError:
                self._producer.poll(0.1)  # local queue full: let deliveries drain
            except KafkaException as exc:  # refused at once (e.g. too large): the batch must not commit
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                self._dlq_failed.append(f"{where}: {err.str()} ({err.name()})" if err else f"{where}: {exc}")
                break
        self._producer.poll(0)

    # -- writing ---------------------------------------------------------------------------------

    def _flush(self, reason: str) -> None:
        """Write the pending batch in one transaction, then store and commit its offsets."""
        p = self._pending
        if not p.count or self._outage is not None:
            return
        try:
            if p.rows:
                self._write_with_retries(p)
            # dead letters are part of the batch: they must be acknowledged before their offsets move
            if self._producer is not None:
                left = self._producer.flush(30)
                if left or self._dlq_failed:
                    n, failed = len(self._dlq_failed) + left, list(self._dlq_failed)
                    if left:
                        failed.append(f"{left} not acknowledged within 30 s")
                    self._renew_producer()
                    raise _Outage(f"dead-letter delivery to {self.catalog.frames_dlq} failed for {n} "
                                  f"record(s): {'; '.join(failed[:3])}")
        except _Outage as exc:
            self._enter_outage(str(exc))
            return
        offsets = [TopicPartition(t, part, off) for (t, part), off in p.offsets.items()]
        try:
            self._consumer.store_offsets(offsets=offsets)
            self._consumer.commit(offsets=offsets, asynchronous=False)
            self.stats.commits += 1
            self._end_trial()
        except KafkaException as exc:
            # e.g. a rebalance took the partitions: the rows are written, redelivery is harmless
            log.warning("offset commit failed", extra={"error": str(exc), "reason": reason})
        self.stats.batches += 1
        log.debug("batch written", extra={"reason": reason, "messages": p.count, "rows": len(p.rows)})
        self._pending = _Pending()

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

    def _write_with_retries(self, p: _Pending) -> None:
        delay = 0.2
        for attempt in range(1, self.db_retries + 1):
            try:
                t0 = time.perf_counter()
                self._write(list(p.rows.values()))
                SINK_WRITE_MS.labels("postgres").observe((time.perf_counter() - t0) * 1000)
                return
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                # a row the database refuses: isolate it rather than retry the whole batch forever
                self.stats.errors += 1
                log.warning("batch refused, writing rows one by one", extra={"error": str(exc)})
                self._write_one_by_one(p)
                return
            except psycopg.Error as exc:
                self.stats.errors += 1
                log.debug("database write failed", extra={"attempt": attempt, "error": str(exc)})
                self._close_conn()
                if attempt == self.db_retries:
                    raise _Outage(f"PostgreSQL write failed ({' '.join(str(exc).split())[:200]})") from exc
                SINK_RETRIES.labels("postgres").inc()
                time.sleep(delay)
                delay *= 2

    def _write_one_by_one(self, p: _Pending) -> None:
        self._rollback()
        for fid, item in p.rows.items():
            try:
                self._write([item])
            except (psycopg.errors.DataError, psycopg.errors.IntegrityError) as exc:
                self._rollback()
                self._dead_letter(p.msgs[fid], exc, frame_id=str(fid))

    def _rollback(self) -> None:
        if self._conn is not None and not self._conn.closed:
            self._conn.rollback()

    def _write(self, items: list[tuple[tuple[Any, ...], list[tuple[Any, ...]]]]) -> None:
        conn = self._connection()
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
                self.stats.defects_written += n
        now = datetime.now(UTC)
        for row, _ in items:  # counted once the transaction committed
            if row[0] in written:
                SINK_ROWS.labels("postgres", row[1], row[12]).inc()
                END_TO_END_MS.labels("postgres").observe(max(0.0, (now - row[5]).total_seconds() * 1000))
                for stage, ms in json.loads(row[15]).items():
                    if isinstance(ms, int | float):
                        FRAME_STAGE_MS.labels(stage.removesuffix("_ms")).observe(ms)
        self.stats.rows_written += len(written)
        self.stats.rows_skipped += len(items) - len(written)

    # -- rebalance -------------------------------------------------------------------------------

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self.assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("partitions assigned", extra={"partitions": [p.partition for p in partitions]})
        if self._outage is not None and partitions:
            with contextlib.suppress(KafkaException):
                self._consumer.pause(partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # hand back cleanly: what we consumed so far is written and committed before the move
        log.info("partitions revoked", extra={"partitions": [p.partition for p in partitions]})
        self.assigned -= {(tp.topic, tp.partition) for tp in partitions}
        self._flush("revoke")

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # another member may own them already; writing is still idempotent, committing is not ours
        log.warning("partitions lost", extra={"partitions": [p.partition for p in partitions]})
        self.assigned -= {(p.topic, p.partition) for p in partitions}
        p = self._pending
        if p.rows and self._outage is None:
            try:
                self._write_with_retries(p)
            except _Outage as exc:  # the new owner writes them; ours are simply dropped
                log.warning("rows of lost partitions not written", extra={"error": str(exc)})
            p.rows, p.msgs = {}, {}
        lost = {(tp.topic, tp.partition) for tp in partitions}
        p.offsets = {k: v for k, v in p.offsets.items() if k not in lost}
        p.first = {k: v for k, v in p.first.items() if k not in lost}
