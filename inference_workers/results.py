"""Result emission of the inference worker: inspections and dead letters, delivery reports, offsets,
the per-batch Kafka transaction (exactly_once) and the delivery-stall monitor.

Every consumed FrameRef ends as exactly one Inspection or one DeadLetter record. exactly_once: each
completed batch is one transaction (results + the consumed offsets they cover); an abortable error
aborts and rewinds to the last committed offsets; a fenced producer stops the worker. at_least_once:
an offset is stored only after the broker acknowledged its record, committed on an interval.

A mixin of :class:`inference_workers.worker.InferenceWorker`: the state (producer, DLQ publisher,
``_committed``, ``_undelivered``, the transaction flags) lives on the worker and is declared in its
``__init__``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from inference_workers.dlq import DeadLetterPublisher, source_of
from inference_workers.errors import InferenceError
from inference_workers.stages import Frame, Job, PartKey
from inference_workers.verdict import FAIL
from infra import kafka
from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.kafka_security import denial, denied_message
from schemas.serde import RegistryUnavailable, serialize

if TYPE_CHECKING:
    from inference_workers.worker import InferenceWorker

log = logging.getLogger("inference_workers.worker")

# A broker outage of minutes is ridden out: the producer keeps retrying a result this long before
# reporting it undelivered (then the partition is rewound and paused, not the worker stopped).
DELIVERY_TIMEOUT_MS = 300_000
# A transaction lasts one batch's produce + commit (milliseconds); the broker aborts one left open this
# long (a worker that died and was not restarted under the same id), which unblocks read_committed readers.
TXN_TIMEOUT_MS = 30_000
SEND_OFFSETS_GIVE_UP_S = 15.0  # the consumer is not polled meanwhile: abort and redo the batch instead
STOP_GRACE_S = 5.0
# A transaction call that has not returned this long is hung, whatever its timeout said (librdkafka
# #5456/#5511: send_offsets_to_transaction can block for good after a broker restart): the producer is
# replaced (the new one, same transactional.id, fences the old and aborts its transaction).
TXN_CALL_HANG_S = 10.0  # after a stop request, hung deliveries are waited for this long, then given up
STALL_LOG_EVERY_S = 30.0


class WorkerError(InferenceError):
    """The worker cannot go on (the model fails on everything, fenced, denied, the consumer failed fatally)."""


def _now_us() -> int:
    return time.time_ns() // 1000


def _key(msg: Message) -> PartKey:
    return (msg.topic(), msg.partition())


class _TxnHung(Exception):
    """A transaction call of the client did not return (see TXN_CALL_HANG_S)."""


class _Stripped:
    """A consumed message without its value and headers (for a dead letter that would be too large)."""

    def __init__(self, m: Message) -> None:
        import hashlib

        self._m = m
        value = m.value() or b""
        self.note = (f"original message of {len(value)} B not embedded (too large); "
                     f"sha256 {hashlib.sha256(value).hexdigest()}")

    def value(self) -> bytes:
        return b""

    def headers(self) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._m, name)



class ResultEmitter:
    """Produce results and dead letters, acknowledge offsets, run the batch transactions (module docstring)."""

    def _new_producer(self: InferenceWorker) -> None:
        """The result producer; for exactly_once a transactional one, initialised (this fences and aborts
        what an earlier instance with the same transactional.id left open). None when stopped meanwhile."""
        conf: dict[str, Any] = {"message.timeout.ms": self.delivery_timeout_ms}
        if self.exactly_once:
            conf |= {"transactional.id": self.transactional_id, "transaction.timeout.ms": TXN_TIMEOUT_MS,
                     "message.timeout.ms": min(self.delivery_timeout_ms, TXN_TIMEOUT_MS)}
        p = kafka.producer(self.settings, client_id=self.worker_id, **conf)
        if self.exactly_once:
            warned = False
            while True:
                try:
                    if not self._bounded(lambda: p.init_transactions(5.0)):
                        if self._stop.is_set():
                            self._producer = self._dlq = None
                            return
                        raise WorkerError(f"initialising transactions for {self.transactional_id} did not return "
                                          f"within {TXN_CALL_HANG_S:.0f} s")
                    break
                except KafkaException as exc:
                    err = exc.args[0]
                    if denial(err):
                        raise WorkerError(denied_message(self.settings, err,
                                                         f"{self.transactional_id} (transactions)")) from None
                    if err.fatal() or not err.retriable():
                        raise WorkerError(f"cannot initialise transactions for {self.transactional_id}: "
                                          f"{err.str()}") from None
                    if not warned:
                        log.warning("transactions not initialised yet (broker unavailable?); retrying",
                                    extra=self.log_extra | {"transactional_id": self.transactional_id,
                                                            "error": err.str()})
                        warned = True
                if self._stop.is_set():
                    self._producer = self._dlq = None
                    return
            self._txn_open = False
        self._producer = p
        self._dlq = DeadLetterPublisher(p, self.catalog.frames_dlq, self.worker_id)

    def _poll_producer(self: InferenceWorker) -> None:
        if self._producer is not None:
            try:
                self._producer.poll(0)
            except KafkaException as exc:  # a fatal producer error surfaces here too
                self._undelivered.append((("", -1), -1, str(exc), True))

    def _complete_in_txn(self: InferenceWorker, job: Job) -> None:
        """One batch = one transaction: its results and the offsets they cover commit together."""
        if not self._current(job.frames) or self._fatal is not None or self._abandoned:
            return
        assert self._producer is not None
        try:
            self._producer.begin_transaction()
        except KafkaException as exc:
            self._on_txn_error(exc)
            return
        self._txn_open = True
        self._complete(job)
        self._waiting_since = time.monotonic()  # the stall monitor watches the commit from here
        try:
            self._end_txn()
        finally:
            self._waiting_since = None

    def _end_txn(self: InferenceWorker) -> None:
        """Flush (delivery reports ack the offsets), send the acked offsets, commit; abort on failure."""
        p, c = self._producer, self._consumer
        assert p is not None and c is not None
        offsets: list[TopicPartition] = []
        try:
            while p.flush(1.0) > 0:
                if self._stop_overdue():
                    self._abandon()
                    return
            if self._undelivered:
                _k, _o, why, _f = self._undelivered[0]
                self._abort_txn(f"{len(self._undelivered)} result(s) not delivered ({why})")
                return
            offsets = self._txn_offsets()
            if offsets:
                meta = c.consumer_group_metadata()
                if not self._retry_txn_call(lambda t: p.send_offsets_to_transaction(offsets, meta, t),
                                            "send offsets", give_up_s=SEND_OFFSETS_GIVE_UP_S):
                    return
            if not self._retry_txn_call(p.commit_transaction, "commit"):
                return
        except KafkaException as exc:
            self._on_txn_error(exc)
            return
        except _TxnHung as exc:
            self._replace_producer(str(exc))
            return
        self._txn_open = False
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset
        self.stats.transactions += 1
        self.metrics.transactions.inc()
        self._progress()

    def _txn_offsets(self: InferenceWorker) -> list[TopicPartition]:
        out = []
        for k in self.parts:
            o = self.offsets.committable(k)
            if o is not None and o > self._committed.get(k, -1):
                out.append(TopicPartition(k[0], k[1], o))
        return out

    def _retry_txn_call(self: InferenceWorker, call: Callable[[float], Any], what: str, *, give_up_s: float | None = None) -> bool:
        """Run a transaction step in 1 s tries while it fails retriably (the broker is slow or away); False
        when a stop request is overdue (the transaction is abandoned). Other errors raise; so does a
        retriable one that lasts ``give_up_s`` (the caller aborts and redoes the batch)."""
        t0 = time.monotonic()
        seen: set[str] = set()
        while True:
            try:
                if self._bounded(lambda: call(1.0)):
                    return True
                if self._stop_overdue():
                    self._abandon()
                    return False
                raise _TxnHung(f"transaction {what} did not return within {TXN_CALL_HANG_S:.0f} s")
            except KafkaException as exc:
                err = exc.args[0]
                if err.fatal() or err.txn_requires_abort() or not err.retriable():
                    raise
                if give_up_s is not None and time.monotonic() - t0 > give_up_s:
                    raise
                if err.name() not in seen:  # one line per kind of error, not one per try
                    seen.add(err.name())
                    log.info(f"transaction {what} not done yet; retrying", extra=self.log_extra | {
                        "error": err.str(), "code": err.name()})
            if self._stop_overdue():
                self._abandon()
                return False

    def _bounded(self: InferenceWorker, fn: Callable[[], Any]) -> bool:
        """Run ``fn`` in a helper thread: True once it returned (its exception re-raised here), False while
        it still runs after TXN_CALL_HANG_S or once a stop request is overdue."""
        box: list[BaseException] = []

        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                box.append(exc)

        t = threading.Thread(target=run, name=f"txn-call-{self.worker_id}", daemon=True)
        t.start()
        deadline = time.monotonic() + TXN_CALL_HANG_S
        while t.is_alive():
            t.join(0.25)
            if t.is_alive() and (time.monotonic() > deadline or self._stop_overdue()):
                return False
        if box:
            raise box[0]
        return True

    def _replace_producer(self: InferenceWorker, why: str) -> None:
        """Give up a producer stuck in a transaction call: a new one with the same transactional.id fences
        it and aborts its transaction; every partition is rewound to its committed offset."""
        self._txn_gen += 1
        self._txn_open = False
        self._undelivered = []
        self.stats.producer_restarts += 1
        self.metrics.producer_restarts.inc()
        log.warning("replacing the transactional producer; partitions rewound to their committed offsets",
                    extra=self.log_extra | {"reason": why, "transactional_id": self.transactional_id})
        self._new_producer()  # the old one is left to its hung call (daemon thread), never used again
        if self._producer is None:  # stopped meanwhile
            self._abandoned = True
            return
        self._rewind_to_committed("producer replaced")

    def _rewind_to_committed(self: InferenceWorker, why: str) -> None:
        for k in list(self.parts):
            base = self._committed.get(k)
            if base is not None:
                self.offsets.forget({k})
                self._rewind(k, base, why, reason="txn_aborted")

    def _on_txn_error(self: InferenceWorker, exc: KafkaException) -> None:
        err: KafkaError = exc.args[0]
        if err.fatal():
            # Fenced: another instance with our transactional.id (or worker id) initialised after us, or
            # the transaction outlived transaction.timeout.ms. Stop rather than re-initialise: a second
            # instance with the same id would be fenced in turn, and the two would take turns forever.
            self._txn_open = False
            self._fatal = WorkerError(
                f"producer fenced ({err.str()}): another worker with transactional.id {self.transactional_id} "
                "took over, or a transaction outlived its timeout; stopping without committing")
            return
        self._abort_txn(f"transaction failed ({err.str()})")

    def _abort_txn(self: InferenceWorker, why: str) -> None:
        """Abort the open transaction and rewind every partition to its last committed offset."""
        assert self._producer is not None
        self._txn_gen += 1
        self.stats.aborts += 1
        self.metrics.txn_aborts.inc()
        try:
            if not self._retry_txn_call(self._producer.abort_transaction, "abort"):
                return
        except _TxnHung as exc:
            self._replace_producer(str(exc))
            return
        except KafkaException as exc:
            if exc.args[0].fatal():
                self._on_txn_error(exc)
            else:
                self._fatal = WorkerError(f"cannot abort the transaction: {exc}")
            return
        self._txn_open = False
        self._undelivered = []
        log.warning("transaction aborted; partitions rewound to their committed offsets",
                    extra=self.log_extra | {"reason": why})
        self._rewind_to_committed("transaction aborted")

    def _abandon(self: InferenceWorker) -> None:
        if not self._abandoned:
            self._abandoned = True
            log.warning("stopping while deliveries hang: the open transaction and unacknowledged results are "
                        "left (the broker aborts them; the frames are redone by the next owner)",
                        extra=self.log_extra | {"in_queue": len(self._producer) if self._producer else 0})

    def _stop_overdue(self: InferenceWorker) -> bool:
        if not self._stop.is_set():
            return False
        now = time.monotonic()
        if self._stop_seen_at is None:
            self._stop_seen_at = now
        return now - self._stop_seen_at >= STOP_GRACE_S

    def _progress(self: InferenceWorker) -> None:
        """Deliveries are moving (a result acknowledged, a transaction committed, nothing pending)."""
        with self._stall_lock:
            self._progress_at = time.monotonic()
            if self._stalled_since is not None:
                log.info("deliveries resumed", extra=self.log_extra | {
                    "stalled_s": round(self._progress_at - self._stalled_since, 1)})
                self._stalled_since = None
                self.metrics.delivery_stalled.set(0)

    def _watch_deliveries(self: InferenceWorker) -> None:
        """A thread of its own: the poll thread may be blocked inside the client while the broker hangs
        (a transaction call can outlast its timeout), and the stall must still be reported."""
        while not self._watch_stop.wait(0.5):
            try:
                self._check_stall()
            except Exception as exc:  # never let the monitor die silently
                log.warning("delivery monitor failed", extra=self.log_extra | {"error": str(exc)})

    def _check_stall(self: InferenceWorker) -> None:
        """Warn once (then every STALL_LOG_EVERY_S) while results stay unacknowledged or a transaction
        commit does not return; unready meanwhile."""
        p = self._producer
        pending = len(p) if p is not None else 0
        if not pending and self._waiting_since is None:
            self._progress()
            return
        with self._stall_lock:
            self._check_stall_locked(pending)

    def _check_stall_locked(self: InferenceWorker, pending: int) -> None:
        now = time.monotonic()
        if now - self._progress_at < self._stall_s:
            return
        if self._stalled_since is None:
            self._stalled_since = self._progress_at
            self._stall_logged_at = now
            self.metrics.delivery_stalled.set(1)
            log.warning("deliveries stalled: results unacknowledged (broker unavailable?); unready until they resume",
                        extra=self.log_extra | {"unacknowledged": pending, "stalled_s": round(now - self._progress_at, 1),
                                                "in_transaction": self._txn_open})
        elif now - self._stall_logged_at >= STALL_LOG_EVERY_S:
            self._stall_logged_at = now
            log.warning("deliveries still stalled", extra=self.log_extra | {
                "unacknowledged": pending, "stalled_s": round(now - self._stalled_since, 1)})

    def _ack(self: InferenceWorker, k: PartKey, offset: int, what: str, ident: str | None) -> Callable[[KafkaError | None, Message], None]:
        gen = self._txn_gen

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if gen != self._txn_gen:
                return  # a report of an aborted transaction: its frames are consumed again
            if err is not None and self._fatal is None and denial(err):  # no ACL for the output topic
                self._fatal = WorkerError(denied_message(self.settings, err, _msg.topic() or ""))
                return
            if err is not None:
                log.error("result not delivered; the partition is rewound to it and paused", extra=self.log_extra | {
                    "frame_id": ident, "source": f"{k[0]}[{k[1]}]@{offset}", "record": what, "error": str(err)})
                self._undelivered.append((k, offset, f"{what} not delivered: {err}", bool(err.fatal())))
                return
            self.stats.delivered += 1
            self.offsets.ack(k, offset)
            self._progress()

        return on_delivery

    def _store_ready(self: InferenceWorker) -> None:
        ready = self.offsets.ready()
        self.metrics.in_flight.set(self.offsets.in_flight())
        if not ready or self._consumer is None or self.exactly_once:
            return
        try:
            self._consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in ready.items()])
        except KafkaException as exc:
            log.warning("store_offsets failed", extra=self.log_extra | {"error": str(exc)})

    def _commit(self: InferenceWorker) -> None:
        assert self._consumer is not None
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed", extra=self.log_extra | {"error": str(exc)})

    def _handle_undelivered(self: InferenceWorker) -> None:
        """Results the broker did not take: rewind their partitions to them; the worker keeps running
        through broker outages. A producer in a fatal state is replaced (at_least_once) or stops the
        worker (exactly_once: fenced). In exactly_once a failed delivery aborts its transaction instead."""
        if not self._undelivered or self._txn_open:
            return
        failed, self._undelivered = self._undelivered, []
        self.stats.undelivered += len(failed)
        self.metrics.undelivered.inc(len(failed))
        if self.exactly_once:
            if any(fatal for *_, fatal in failed) and self._fatal is None:
                self._fatal = WorkerError(f"producer failed fatally: {failed[0][2]}")
            return
        first: dict[PartKey, int] = {}
        for k, off, _, _ in failed:
            if k in self.parts:
                first[k] = min(first.get(k, off), off)
        if any(fatal for *_, fatal in failed):
            first = self._restart_producer(first)
        for k, off in sorted(first.items()):
            self._rewind(k, off, "result not delivered (broker unavailable?)", reason="undelivered")

    def _restart_producer(self: InferenceWorker, first: dict[PartKey, int]) -> dict[PartKey, int]:
        """Replace the producer; every unacknowledged result is redone (its partition rewound to it)."""
        old = self._producer
        log.warning("recreating the producer after a fatal producer error", extra=self.log_extra)
        if old is not None:
            try:
                old.purge()
            except (KafkaException, AttributeError, NotImplementedError):
                pass
            old.flush(0)
        for k in list(self.parts):
            pending = self.offsets.first_unacked(k)
            if pending is not None:
                first[k] = min(first.get(k, pending), pending)
        self._undelivered = []  # the purge reported these; they are rewound anyway
        self._new_producer()
        self.stats.producer_restarts += 1
        self.metrics.producer_restarts.inc()
        return first

    def _produce_inspection(self: InferenceWorker, f: Frame, rec: dict[str, Any]) -> None:
        """Stamp the record's production time, serialise and produce it."""
        assert f.ref is not None
        ref, m = f.ref, f.msg
        now = _now_us()
        total_ms = max(0.0, (now - int(ref["captured_at"])) / 1000)
        rec["inspected_at"] = now
        rec["timings"]["total_ms"] = round(total_ms, 3)
        st = self.parts.get(f.key)
        if st is None or st.epoch != f.epoch:
            return  # its partition was rewound while this batch was emitted (the registry below)
        try:
            value, headers = serialize("inspection", rec)
        except RegistryUnavailable as exc:  # transient: this frame and what follows it are redone later
            self._rewind(f.key, m.offset(), f"schema registry unavailable ({exc})", reason="registry_unavailable")
            return
        except Exception as exc:  # never a crash loop on one frame: it goes to the DLQ instead
            self._dead_letter(m, "inspection_error", f"{type(exc).__name__}: {exc}", ref.get("frame_id"))
            return
        if f.review:  # active-learning marks (inference_workers/review.py): headers, not the Avro contract
            headers = [*headers, *f.review]
        if not self._produce(self.catalog.inspections, ref["camera_id"].encode(), value, headers,
                             self._ack(f.key, m.offset(), "inspection", ref["frame_id"]), f.key, m.offset()):
            return
        self.stats.inspected += 1
        self.metrics.frames.labels("inspected").inc()
        self.metrics.verdicts.labels(rec["verdict"]).inc()
        self.metrics.latency_ms.observe(total_ms)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("frame inspected", extra=self.log_extra | {
                "frame_id": ref["frame_id"], "source": source_of(m), "verdict": rec["verdict"],
                "detections": len(rec["detections"]), "failed": rec["verdict"] == FAIL})

    def _produce(self: InferenceWorker, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                 on_delivery: Callable[[KafkaError | None, Message], None], k: PartKey, offset: int) -> bool:
        """Produce one result; False (and the source offset queued for a rewind) if the producer refuses."""
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                return True
            except BufferError:
                self._producer.poll(0.1)  # local queue full: let deliveries drain
                if self._stop_overdue():
                    self._undelivered.append((k, offset, "not produced: stopping while the queue is full", False))
                    return False
            except KafkaException as exc:  # a producer in a fatal state: recreated by the loop
                log.error("result not produced", extra=self.log_extra | {
                    "source": f"{k[0]}[{k[1]}]@{offset}", "error": str(exc)})
                self._undelivered.append((k, offset, f"not produced: {exc}", True))
                return False

    def _dead_letter(self: InferenceWorker, m: Message, error_type: str, error_message: str, frame_id: str | None) -> None:
        assert self._dlq is not None and self._producer is not None
        k = _key(m)
        cb = self._ack(k, m.offset(), "dead letter", frame_id)
        while True:
            try:
                self._dlq.publish(m, error_type=error_type, error_message=error_message, frame_id=frame_id,
                                  on_delivery=cb)
                break
            except BufferError:
                self._producer.poll(0.1)
            except KafkaException as exc:
                # e.g. MSG_SIZE_TOO_LARGE (the record embeds the original message): never a crash loop.
                # Dead-letter it without the original body (its size and hash are kept in the message);
                # if even that fails, rewind the partition to it and pause.
                log.error("dead letter could not be produced", extra=self.log_extra | {
                    "frame_id": frame_id, "source": source_of(m), "error_type": error_type, "error": str(exc)})
                if isinstance(m, _Stripped):
                    self._undelivered.append((k, m.offset(), f"dead letter not produced: {exc}", False))
                    return
                m = _Stripped(m)
                error_message = f"{error_message} [{m.note}]"
        self.stats.dead_lettered += 1
        self.stats.dlq_by_type[error_type] = self.stats.dlq_by_type.get(error_type, 0) + 1
        self.metrics.frames.labels("dlq").inc()
        self.metrics.dlq.labels(error_type).inc()

