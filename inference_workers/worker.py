"""The inference worker: frames topic -> micro-batch -> fetch + decode -> detect -> inspections / DLQ.

One member of the ``inference-workers`` consumer group, run as overlapped stages joined by bounded
hand-offs::

    poll thread         fetch pool (N threads)     infer thread          poll thread
    consume -> batch -> fetch + decode + stats  ->  detector (1 batch) -> verdict, produce, store offsets
                        + letterbox to tensor
                 \\__________ at most ``pipeline_depth`` batches in flight, completed in order __________/

While batch N is inferred, batch N+1 is fetched, decoded and turned into model input (letterbox,
RGB, scale) and the results of N-1 are produced: the infer thread only stacks tensors and runs the
model.
The in-flight window is the bound: when it is full the poll thread waits for the oldest batch and,
if that takes long, pauses its partitions (backpressure by pausing, never by growth).

Every consumed FrameRef ends as exactly one Inspection or one DeadLetter record. With
``SQIS_WORKER_DELIVERY=exactly_once`` (the default) each completed batch is one Kafka transaction:
its results and the consumed offsets they cover commit together (``send_offsets_to_transaction``),
readers use ``read_committed``, and a restarted worker with the same ``transactional.id`` fences its
zombie. An abortable transaction error aborts, rewinds the batch's partitions to their last committed
offsets and goes on; a fenced producer stops the worker with one line. With ``at_least_once`` an
offset is stored only after the broker acknowledged that record, in order per partition, and
committed on an interval plus a final synchronous commit (a crash may publish a result twice).

Failures that are not the frame's fault rewind the partition to the frame and pause it with backoff
instead of dead-lettering it: an object-store outage (for as long as it lasts; a gauge says so), a
result the broker did not take (a broker outage), a model that fails on every frame (after
``max_inference_failures`` such batches in a row the worker stops, without committing past them). A
frame the model alone fails on (the model still runs on a probe image) is retried
``max_frame_retries`` times and then dead-lettered as ``inference_error``.

Deliveries that stall (results unacknowledged for ``worker_delivery_stall_s``) log one warning, then
a count every 30 s, and make /readyz unready until they resume. A stop request is honoured within
STOP_GRACE_S even while deliveries hang: the open transaction is left for the broker to abort.

A rewind bumps the partition's epoch: results of batches still in flight for an older epoch are
dropped, so offsets stay in order and nothing is produced twice from one consumption.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from inference_workers.batching import MicroBatcher, OffsetTracker
from inference_workers.detector import Thresholds
from inference_workers.dlq import UNDECODABLE, DeadLetterPublisher, source_of
from inference_workers.errors import InferenceError
from inference_workers.fetch import DEFAULT_MAX_FRAME_BYTES, FrameFetcher
from inference_workers.inference import (
    ModelSwitch,
    RecordError,
    VerdictPolicy,
    served_model,
    shared_segmenter,
)
from inference_workers.stages import Frame, Inferred, Job, StagePipeline
from inference_workers.tiling import TiledDetector, TileSpec
from inference_workers.verdict import FAIL
from infra import kafka
from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.kafka_security import denial, denied_message
from infra.metrics import HealthServer, serve
from infra.objectstore import ObjectStore, open_store
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import SchemaError, deserialize, serialize

log = logging.getLogger(__name__)

DEFAULT_GROUP = "inference-workers"
# A broker outage of minutes is ridden out: the producer keeps retrying a result this long before
# reporting it undelivered (then the partition is rewound and paused, not the worker stopped).
DELIVERY_TIMEOUT_MS = 300_000
STALL_PAUSE_S = 1.0  # pipeline full for this long: pause the partitions until it drains
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

_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)

PartKey = tuple[str, int]


class WorkerError(InferenceError):
    """The worker cannot go on (the model fails on everything, the consumer failed fatally)."""


class _TxnHung(Exception):
    """A transaction call of the client did not return (see TXN_CALL_HANG_S)."""


class WorkerMetrics:
    """The Prometheus metrics of one worker, in its own registry (two workers in a process never mix)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.frames = Counter("sqis_worker_frames_total", "frames handled", ["outcome"], registry=r)
        self.verdicts = Counter("sqis_worker_verdicts_total", "inspections by verdict", ["verdict"], registry=r)
        self.batches = Counter("sqis_worker_batches_total", "batches run through the detector", registry=r)
        self.dlq = Counter("sqis_worker_dlq_total", "dead-lettered frames", ["error_type"], registry=r)
        self.rewinds = Counter("sqis_worker_partition_rewinds_total", "partitions rewound and paused", ["reason"],
                               registry=r)
        self.batch_size = Histogram("sqis_worker_batch_size", "frames per detector batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.stage_ms = Histogram("sqis_worker_stage_ms", "per-batch stage wall time (ms)", ["stage"],
                                  buckets=_MS_BUCKETS, registry=r)
        self.latency_ms = Histogram("sqis_worker_latency_ms", "captured_at -> inspection produced (ms)",
                                    buckets=_MS_BUCKETS, registry=r)
        self.model_reloads = Counter("sqis_worker_model_reloads_total", "detector hot swaps", registry=r)
        self.in_flight = Gauge("sqis_worker_in_flight", "consumed messages whose result is not acknowledged yet",
                               registry=r)
        self.batches_in_flight = Gauge("sqis_worker_batches_in_flight", "batches between dispatch and completion",
                                       registry=r)
        self.store_unavailable = Gauge("sqis_worker_store_unavailable",
                                       "partitions paused because the object store is unreachable", registry=r)
        self.backpressure = Counter("sqis_worker_backpressure_pauses_total",
                                    "times the partitions were paused because the pipeline was full", registry=r)
        self.undelivered = Counter("sqis_worker_undelivered_total", "results the broker did not acknowledge",
                                   registry=r)
        self.model_info = Info("sqis_model", "the model a worker serves (name, version, providers)",
                               ["worker_id"], registry=r)
        self.producer_restarts = Counter("sqis_worker_producer_restarts_total",
                                         "producers recreated after a fatal producer error", registry=r)
        self.transactions = Counter("sqis_worker_transactions_total", "transactions committed", registry=r)
        self.txn_aborts = Counter("sqis_worker_transaction_aborts_total", "transactions aborted (batch redone)",
                                  registry=r)
        self.delivery_stalled = Gauge("sqis_worker_delivery_stalled",
                                      "1 while results stay unacknowledged past the stall limit", registry=r)


@dataclass
class WorkerStats:
    """Counters of one worker's run (also exported as Prometheus metrics)."""

    consumed: int = 0
    inspected: int = 0
    dead_lettered: int = 0
    batches: int = 0
    rewinds: int = 0
    model_reloads: int = 0
    delivered: int = 0
    undelivered: int = 0
    producer_restarts: int = 0
    backpressure_pauses: int = 0
    transactions: int = 0
    aborts: int = 0
    prepared_batches: int = 0  # batches whose model input was made in the fetch pool (not the infer thread)
    dlq_by_type: dict[str, int] = field(default_factory=dict)


@dataclass
class PartitionState:
    """Everything the worker knows about one assigned partition."""

    key: PartKey
    epoch: int = 0  # bumped on every rewind: in-flight results of older epochs are dropped
    rewound_to: int | None = None  # after a seek: skip stale messages until this offset comes again
    resume_at: float | None = None  # paused for a backoff until this monotonic time
    backoff_s: float = 0.0
    retry_offset: int = -1  # the offset the last rewinds went back to ...
    retries: int = 0  # ... and how many times in a row
    store_down: bool = False  # paused because the object store is unreachable
    flow_paused: bool = False  # paused because the pipeline is full
    paused: bool = False  # what the consumer was last told

    @property
    def label(self) -> str:
        return f"{self.key[0]}[{self.key[1]}]"

    def count_retry(self, offset: int) -> int:
        """Record one more rewind to ``offset``; returns how many in a row went there."""
        self.retries = self.retries + 1 if self.retry_offset == offset else 1
        self.retry_offset = offset
        return self.retries

    def next_backoff(self, lo: float, hi: float) -> float:
        self.backoff_s = min(hi, max(lo, self.backoff_s * 2))
        return self.backoff_s

    def want_paused(self, now: float) -> bool:
        return self.flow_paused or (self.resume_at is not None and self.resume_at > now)


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


def _now_us() -> int:
    return time.time_ns() // 1000


def _key(msg: Message) -> PartKey:
    return (msg.topic(), msg.partition())


class InferenceWorker:
    """A consumer-group member that turns FrameRefs into Inspections (see the module docstring)."""

    def __init__(self, settings: Settings, model_uri: str, thresholds: Thresholds | None = None, max_batch: int = 8,
                 max_wait_ms: float = 10.0, fetch_threads: int = 4, worker_id: str | None = None, *,
                 group_id: str = DEFAULT_GROUP, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 model_poll_s: float = 30.0, store: ObjectStore | None = None,
                 rewind_backoff_s: tuple[float, float] | None = None, max_frame_retries: int = 2,
                 max_inference_failures: int = 5, pipeline_depth: int = 2,
                 delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS, registry: CollectorRegistry | None = None,
                 tile: TileSpec | None = None, delivery: str | None = None) -> None:
        from inference_workers.model_loader import ModelWatcher

        self.settings = settings
        self.thresholds = thresholds or Thresholds()
        self.tile = tile  # run each frame as overlapping tiles (inference_workers/tiling.py); still one Inspection
        self.max_batch = max_batch
        self.group_id = group_id
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.catalog = TopicCatalog(settings.topic_prefix)
        self.metrics = WorkerMetrics(registry)
        # The model first: a worker that cannot load one fails here, before it joins the group.
        self.watcher = ModelWatcher(settings, model_uri, thresholds, poll_s=model_poll_s,  # None: calibrated
                                    check=lambda det: self.models.served(det))
        if hasattr(self.watcher.current, "warmup"):
            self.watcher.current.warmup(max_batch)
        # one retry layer: the fetcher's, bounded by a per-batch deadline (botocore tries once)
        self.store = store or open_store(settings, s3_attempts=1)
        self.fetcher = FrameFetcher.from_settings(self.store, settings, fetch_threads, max_frame_bytes=max_frame_bytes,
                                                  registry=self.metrics.registry)
        # the served model (detector + segmenter of one version), rebuilt for every detector the watcher swaps in
        shared = shared_segmenter(settings, model_uri, tiled=tile is not None)
        self.models = ModelSwitch(lambda det: served_model(TiledDetector(det, tile) if tile is not None else det,
                                                           segmenter=settings.segmenter, shared=shared,
                                                           thresholds=self.thresholds))
        self.models.served(self.watcher.current)  # a model that cannot be served fails here, before joining
        self.policy = VerdictPolicy.from_settings(settings)
        self.pipeline = StagePipeline(self.fetcher, self.models, lambda: self.watcher.current, self.policy,
                                      depth=pipeline_depth, worker_id=self.worker_id, store=self.store)
        self.batcher: MicroBatcher[Message] = MicroBatcher(max_batch, max_wait_ms)
        self.offsets: OffsetTracker[PartKey] = OffsetTracker()
        self.parts: dict[PartKey, PartitionState] = {}
        self.stats = WorkerStats()
        self.pipeline_depth = pipeline_depth
        self.max_frame_retries = max_frame_retries
        self.max_inference_failures = max_inference_failures
        self.delivery_timeout_ms = delivery_timeout_ms
        if rewind_backoff_s is None:  # SQIS_WORKER_REWIND_BACKOFF_{MIN,MAX}_S
            lo = settings.worker_rewind_backoff_min_s
            rewind_backoff_s = (lo, max(lo, settings.worker_rewind_backoff_max_s))
        self._rewind_backoff = rewind_backoff_s
        self.delivery = delivery or settings.worker_delivery
        if self.delivery not in ("exactly_once", "at_least_once"):
            raise ValueError(f"delivery must be exactly_once or at_least_once, not {self.delivery!r}")
        self.exactly_once = self.delivery == "exactly_once"
        # stable per worker instance: a restart with the same worker id fences the previous one
        self.transactional_id = f"{settings.topic_prefix}{group_id}.{self.worker_id}"
        self._txn_open = False
        self._txn_gen = 0  # bumped on abort: late delivery reports of an aborted transaction are ignored
        self._committed: dict[PartKey, int] = {}  # exactly_once: the partition's last committed offset
        self._abandoned = False  # stopping with deliveries hung: nothing more is flushed or committed
        self._stall_s = settings.worker_delivery_stall_s
        self._progress_at = time.monotonic()  # the last time deliveries were not behind
        self._stalled_since: float | None = None
        self._stall_logged_at = 0.0
        self._stop_seen_at: float | None = None
        self._waiting_since: float | None = None  # the poll thread is inside a transaction commit since
        self._stall_lock = threading.Lock()
        self._watch_stop = threading.Event()
        self._inference_failures = 0  # consecutive batches on which the model failed for every frame
        self._stop = threading.Event()
        self._fatal: Exception | None = None
        self._inflight: deque[Job] = deque()
        self._undelivered: list[tuple[PartKey, int, str, bool]] = []  # (partition, offset, error, producer fatal)
        self._consumer: kafka.Consumer | None = None
        self._producer: kafka.Producer | None = None
        self._dlq: DeadLetterPublisher | None = None
        self._metrics_server: HealthServer | None = None
        self.last_poll = time.monotonic()

    # ---- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batches in flight, flush, commit and close (signal-handler safe)."""
        self._stop.set()

    @property
    def batches_in_flight(self) -> int:
        """Batches dispatched and not completed yet (between the poll thread's hand-off and its results)."""
        return len(self._inflight)

    @property
    def log_extra(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id}

    def run(self, stop: threading.Event | None = None) -> WorkerStats:
        """Consume until ``stop`` (or :meth:`stop`) is set; returns the run's counters."""
        if stop is not None:
            self._stop = stop
        self._serve_metrics()
        if hasattr(self.watcher, "start"):
            self.watcher.start()  # for models:/NAME@alias: a thread prepares a promoted model, the loop swaps it
        self._check_access()
        self._new_producer()
        if self._producer is None:  # stopped while the transactions were initialised
            self._shutdown()
            return self.stats
        overrides: dict[str, Any] = {"fetch.wait.max.ms": 50}
        if self.exactly_once:
            overrides["enable.auto.commit"] = False  # offsets are committed inside the transactions
        self._consumer = kafka.consumer(self.settings, group_id=self.group_id, client_id=self.worker_id,
                                        on_denied=self._on_denied, **overrides)
        self.pipeline.start(f"infer-{self.worker_id}")
        threading.Thread(target=self._watch_deliveries, name=f"deliveries-{self.worker_id}", daemon=True).start()
        det = self.watcher.current
        self._set_model_info(det)
        log.info("worker starting", extra=self.log_extra | {
            "group": self.group_id, "topic": self.catalog.frames, "model_name": det.name,
            "model_version": det.version, "max_batch": self.max_batch, "pipeline_depth": self.pipeline_depth,
            "delivery": self.delivery})
        self._consumer.subscribe([self.catalog.frames], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        try:
            self._loop()
            if self._fatal is None:
                last = self.batcher.flush()
                if last is not None:
                    self._dispatch(last.items)
                self._drain()
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise WorkerError(str(self._fatal)) from self._fatal
        return self.stats

    def _loop(self) -> None:
        """The poll thread: consume -> batch -> dispatch; complete finished batches in order."""
        assert self._consumer is not None
        c = self._consumer
        while not self._stop.is_set() and self._fatal is None:
            self.last_poll = time.monotonic()
            self._complete_ready()
            self._handle_undelivered()
            self._sync_pauses()
            left = self.batcher.time_left()
            # With batches in flight, do not block in the client: take what is there, then wait on the
            # oldest batch (woken the moment it is done) so its results are produced without delay.
            wait = 0.0 if self._inflight else self._idle_wait()
            if left is None:
                # No open batch: poll returns as soon as one message is there, then drain what is buffered.
                first = c.poll(wait)
                msgs = [first] if first is not None else []
                if first is not None and self.max_batch > 1:
                    msgs += c.consume(num_messages=self.max_batch - 1, timeout=0)
            else:
                msgs = c.consume(num_messages=max(1, self.batcher.room), timeout=min(wait, left))
            if not msgs and self._inflight:
                self._inflight[0].done.wait(min(0.005, left) if left is not None else 0.005)
            for m in msgs:
                if not self._accept(m):
                    continue
                self.offsets.track(_key(m), m.offset())
                self._committed.setdefault(_key(m), m.offset())  # first consumed since assignment: committed
                self.stats.consumed += 1
                for b in self.batcher.add(m):
                    self._dispatch(b.items)
            due = self.batcher.poll()
            if due is not None:
                self._dispatch(due.items)
            self._poll_producer()
            self._store_ready()
            if self.watcher.maybe_reload():  # pending items are inspected by the new model
                self.stats.model_reloads += 1
                self.metrics.model_reloads.inc()
                self._set_model_info(self.watcher.current)

    def _idle_wait(self) -> float:
        """How long an idle poll may block: 1 s, less when a paused partition's backoff runs out sooner
        (a blocking poll must not stretch every rewind backoff by up to a second)."""
        now = time.monotonic()
        due = [st.resume_at - now for st in self.parts.values() if st.resume_at is not None]
        return max(0.0, min([1.0, *due]))

    def _on_denied(self, line: str) -> None:
        """The broker rejected the credentials: stop with that one line (retrying cannot help)."""
        if self._fatal is None:
            self._fatal = WorkerError(line)

    def _accept(self, m: Message) -> bool:
        """False for errors, revoked partitions and stale messages after a rewind."""
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return False
            if denial(err):  # no credentials or ACL: retrying cannot help, stop with one line
                what = self.group_id if denial(err) == "group" else (m.topic() or self.catalog.frames)
                self._fatal = WorkerError(denied_message(self.settings, err, what))
                return False
            log.error("consumer error", extra=self.log_extra | {"error": str(err)})
            if err.fatal():
                self._fatal = KafkaException(err)
            return False
        st = self.parts.get(_key(m))
        if st is None:
            return False
        if st.rewound_to is not None:
            if m.offset() > st.rewound_to:
                return False  # fetched before the seek; the rewound offset comes again
            st.rewound_to = None
        return True

    def _drain(self) -> None:
        """Complete every batch in flight (at shutdown)."""
        while self._inflight and self._fatal is None and not self._abandoned:
            self._inflight[0].done.wait(0.05)
            self._poll_producer()
            self._complete_ready()
            self._handle_undelivered()

    def _shutdown(self) -> None:
        c, p = self._consumer, self._producer
        try:
            self._watch_stop.set()
            self.pipeline.stop()
            if p is not None and self.exactly_once and self._txn_open:
                self._txn_gen += 1  # the purged results' reports are not failures to act on now
                with contextlib.suppress(KafkaException):
                    p.abort_transaction(1.0)  # else the broker aborts it (or the next start with this id)
            elif p is not None and not self._abandoned:
                left = p.flush(STOP_GRACE_S)  # bounded: deliveries may hang (broker stopped)
                if left:
                    self._abandoned = True
                    log.error("results not delivered at shutdown; their frames are redone by the next owner",
                              extra=self.log_extra | {"in_queue": left})
            if not self.exactly_once and not self._abandoned:
                self._store_ready()
                if c is not None:
                    self._commit()
        finally:
            if c is not None:
                c.close()  # runs on_revoke: already flushed and committed, so it is quick
            if self._producer is not None:
                self._producer.close()
            self._consumer = self._producer = self._dlq = None
            self.fetcher.close()
            if hasattr(self.watcher, "close"):
                self.watcher.close()
            if self._metrics_server is not None:
                self._metrics_server.close()
                self._metrics_server = None
            log.info("worker stopped", extra=self.log_extra | {
                "consumed": self.stats.consumed, "inspected": self.stats.inspected,
                "dead_lettered": self.stats.dead_lettered, "batches": self.stats.batches})

    def _serve_metrics(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        # live: the poll loop turned within a minute; ready: the model is loaded and the consumer is up
        self._metrics_server = serve(port, registry=self.metrics.registry, live=lambda: time.monotonic() - self.last_poll < 60,
                                     ready=lambda: self._consumer is not None and self._fatal is None
                                     and self._stalled_since is None)

    def _set_model_info(self, det: Any) -> None:
        """The model served now, as an info metric (at start and after every hot swap)."""
        self.metrics.model_info.labels(worker_id=self.worker_id).info({
            "model_name": str(det.name), "model_version": str(det.version),
            "providers": ",".join(getattr(det, "providers", ()) or ())})

    def _check_access(self) -> None:
        """With SASL: a refused login, or no ACL on a topic the worker needs, is one line naming the
        principal and the topic, before anything else asks (the transactional id would be refused first,
        naming less). An unreachable broker is left to the clients' retries."""
        if not self.settings.kafka_sasl_mechanism:
            return
        try:
            kafka.check_broker(self.settings, topics=[self.catalog.frames, self.catalog.inspections,
                                                      self.catalog.frames_dlq])
        except kafka.AccessDenied as exc:
            raise WorkerError(str(exc)) from None
        except kafka.BrokerUnavailable:
            pass

    # ---- producer --------------------------------------------------------------------------------
    def _new_producer(self) -> None:
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

    def _poll_producer(self) -> None:
        if self._producer is not None:
            try:
                self._producer.poll(0)
            except KafkaException as exc:  # a fatal producer error surfaces here too
                self._undelivered.append((("", -1), -1, str(exc), True))

    # ---- transactions (exactly_once) ------------------------------------------------------------------
    def _complete_in_txn(self, job: Job) -> None:
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

    def _end_txn(self) -> None:
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

    def _txn_offsets(self) -> list[TopicPartition]:
        out = []
        for k in self.parts:
            o = self.offsets.committable(k)
            if o is not None and o > self._committed.get(k, -1):
                out.append(TopicPartition(k[0], k[1], o))
        return out

    def _retry_txn_call(self, call: Callable[[float], Any], what: str, *, give_up_s: float | None = None) -> bool:
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

    def _bounded(self, fn: Callable[[], Any]) -> bool:
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

    def _replace_producer(self, why: str) -> None:
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

    def _rewind_to_committed(self, why: str) -> None:
        for k in list(self.parts):
            base = self._committed.get(k)
            if base is not None:
                self.offsets.forget({k})
                self._rewind(k, base, why, reason="txn_aborted")

    def _on_txn_error(self, exc: KafkaException) -> None:
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

    def _abort_txn(self, why: str) -> None:
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

    def _abandon(self) -> None:
        if not self._abandoned:
            self._abandoned = True
            log.warning("stopping while deliveries hang: the open transaction and unacknowledged results are "
                        "left (the broker aborts them; the frames are redone by the next owner)",
                        extra=self.log_extra | {"in_queue": len(self._producer) if self._producer else 0})

    def _stop_overdue(self) -> bool:
        if not self._stop.is_set():
            return False
        now = time.monotonic()
        if self._stop_seen_at is None:
            self._stop_seen_at = now
        return now - self._stop_seen_at >= STOP_GRACE_S

    # ---- delivery stalls -----------------------------------------------------------------------
    def _progress(self) -> None:
        """Deliveries are moving (a result acknowledged, a transaction committed, nothing pending)."""
        with self._stall_lock:
            self._progress_at = time.monotonic()
            if self._stalled_since is not None:
                log.info("deliveries resumed", extra=self.log_extra | {
                    "stalled_s": round(self._progress_at - self._stalled_since, 1)})
                self._stalled_since = None
                self.metrics.delivery_stalled.set(0)

    def _watch_deliveries(self) -> None:
        """A thread of its own: the poll thread may be blocked inside the client while the broker hangs
        (a transaction call can outlast its timeout), and the stall must still be reported."""
        while not self._watch_stop.wait(0.5):
            try:
                self._check_stall()
            except Exception as exc:  # never let the monitor die silently
                log.warning("delivery monitor failed", extra=self.log_extra | {"error": str(exc)})

    def _check_stall(self) -> None:
        """Warn once (then every STALL_LOG_EVERY_S) while results stay unacknowledged or a transaction
        commit does not return; unready meanwhile."""
        p = self._producer
        pending = len(p) if p is not None else 0
        if not pending and self._waiting_since is None:
            self._progress()
            return
        with self._stall_lock:
            self._check_stall_locked(pending)

    def _check_stall_locked(self, pending: int) -> None:
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

    # ---- rebalance -----------------------------------------------------------------------------
    def _on_assign(self, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.parts.setdefault((tp.topic, tp.partition), PartitionState((tp.topic, tp.partition)))
        log.info("partitions assigned", extra=self.log_extra | {
            "partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    def _on_revoke(self, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        """Hand the partitions back with minimal duplicates: drop unprocessed, flush, store, commit."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop_pending(keys)
        offsets: list[TopicPartition] = []
        if not self.exactly_once and not self._abandoned:  # exactly_once: every batch committed its offsets
            if self._producer is not None:
                self._producer.flush(10)
            self._store_ready()
            offsets = [TopicPartition(t, p, o) for (t, p) in keys
                       if (o := self.offsets.committable((t, p))) is not None]
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("commit on revoke failed", extra=self.log_extra | {"error": str(exc)})
        self._resume_paused(consumer, keys)
        self._forget(keys)
        log.info("partitions revoked", extra=self.log_extra | {
            "partitions": sorted(f"{t}[{p}]" for t, p in keys), "dropped_unprocessed": dropped,
            "committed": {f"{tp.topic}[{tp.partition}]": tp.offset for tp in offsets}})

    def _on_lost(self, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop_pending(keys)
        self._resume_paused(consumer, keys)
        self._forget(keys)
        log.warning("partitions lost", extra=self.log_extra | {
            "partitions": sorted(f"{t}[{p}]" for t, p in keys), "dropped_unprocessed": dropped})

    def _drop_pending(self, keys: set[PartKey]) -> int:
        """Forget what was consumed from ``keys`` and not produced yet: batcher items, in-flight batches."""
        dropped = self.batcher.drop(lambda m: _key(m) in keys)
        for m in dropped:
            self.offsets.untrack_from(_key(m), m.offset())
        in_flight = sum(1 for j in self._inflight for f in j.frames if f.key in keys)
        for k in keys:
            if k in self.parts:
                self.parts[k].epoch += 1  # their in-flight results are dropped at completion
        return len(dropped) + in_flight

    def _resume_paused(self, consumer: kafka.Consumer, keys: set[PartKey]) -> None:
        """Resume our paused partitions among ``keys`` while still assigned: the client keeps the pause
        flag across a reassignment, so a partition paused now could otherwise never resume."""
        paused = [TopicPartition(*k) for k in sorted(keys) if k in self.parts and self.parts[k].paused]
        if not paused:
            return
        try:
            consumer.resume(paused)
        except KafkaException as exc:
            log.warning("cannot resume paused partitions on revoke", extra=self.log_extra | {
                "partitions": [f"{tp.topic}[{tp.partition}]" for tp in paused], "error": str(exc)})

    def _forget(self, keys: set[PartKey]) -> None:
        self.offsets.forget(keys)
        for k in keys:
            self.parts.pop(k, None)
            self._committed.pop(k, None)
        self.metrics.store_unavailable.set(sum(st.store_down for st in self.parts.values()))

    # ---- offsets -------------------------------------------------------------------------------
    def _ack(self, k: PartKey, offset: int, what: str, ident: str | None) -> Callable[[KafkaError | None, Message], None]:
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

    def _store_ready(self) -> None:
        ready = self.offsets.ready()
        self.metrics.in_flight.set(self.offsets.in_flight())
        if not ready or self._consumer is None or self.exactly_once:
            return
        try:
            self._consumer.store_offsets(offsets=[TopicPartition(t, p, o) for (t, p), o in ready.items()])
        except KafkaException as exc:
            log.warning("store_offsets failed", extra=self.log_extra | {"error": str(exc)})

    def _commit(self) -> None:
        assert self._consumer is not None
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("final commit failed", extra=self.log_extra | {"error": str(exc)})

    def _handle_undelivered(self) -> None:
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

    def _restart_producer(self, first: dict[PartKey, int]) -> dict[PartKey, int]:
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

    # ---- pauses: backoff after a rewind, backpressure ---------------------------------------------
    def _rewind(self, k: PartKey, offset: int, why: str, *, reason: str) -> None:
        """Re-consume ``k`` from ``offset`` after a backoff; in-flight results of ``k`` are dropped."""
        assert self._consumer is not None
        st = self.parts.get(k)
        if st is None:
            return
        self.offsets.untrack_from(k, offset)
        self._drop_pending({k})
        lo, hi = self._rewind_backoff
        delay = st.next_backoff(lo, hi)
        tp = TopicPartition(k[0], k[1], offset)
        try:
            self._consumer.pause([tp])
            st.paused = True
            self._consumer.seek(tp)
        except KafkaException as exc:
            # the partition cannot be rewound in place: stop; the committed offset is still correct
            self._fatal = WorkerError(f"cannot rewind {st.label} to {offset}: {exc}")
            return
        st.rewound_to = offset
        st.resume_at = time.monotonic() + delay
        st.store_down = reason == "store_unavailable"
        self.metrics.store_unavailable.set(sum(s.store_down for s in self.parts.values()))
        self.stats.rewinds += 1
        self.metrics.rewinds.labels(reason).inc()
        log.warning(f"{why}; partition rewound and paused", extra=self.log_extra | {
            "source": f"{st.label}@{offset}", "pause_s": delay, "reason": reason})

    def _sync_pauses(self) -> None:
        """Tell the consumer which partitions to pause or resume (backoffs that ran out, backpressure)."""
        if self._consumer is None or not self.parts:
            return
        now = time.monotonic()
        pause, resume = [], []
        for st in self.parts.values():
            if st.resume_at is not None and st.resume_at <= now:
                st.resume_at = None
            want = st.want_paused(now)
            if want != st.paused:
                (pause if want else resume).append(st)
        try:
            if pause:
                self._consumer.pause([TopicPartition(*st.key) for st in pause])
            if resume:
                self._consumer.resume([TopicPartition(*st.key) for st in resume])
        except KafkaException as exc:
            log.warning("pause/resume failed", extra=self.log_extra | {"error": str(exc)})
            return
        for st in pause:
            st.paused = True
        for st in resume:
            st.paused = False

    def _wait_for_room(self) -> None:
        """Block until fewer than ``pipeline_depth`` batches are in flight; pause the partitions if that
        takes longer than STALL_PAUSE_S (the poll loop must not stall behind a full pipeline)."""
        t0 = time.monotonic()
        flow = False
        while len(self._inflight) >= self.pipeline_depth and self._fatal is None:
            if self._inflight[0].done.wait(0.02):
                self._complete_ready()
                continue
            self._poll_producer()
            self._handle_undelivered()
            if not flow and time.monotonic() - t0 > STALL_PAUSE_S:
                flow = True
                for st in self.parts.values():
                    st.flow_paused = True
                self._sync_pauses()
                self.stats.backpressure_pauses += 1
                self.metrics.backpressure.inc()
                log.info("pipeline full; partitions paused", extra=self.log_extra | {
                    "batches_in_flight": len(self._inflight)})
        if flow:
            for st in self.parts.values():
                st.flow_paused = False
            self._sync_pauses()

    # ---- stage 1 (poll thread): dispatch a batch ---------------------------------------------------
    def _dispatch(self, items: Sequence[Message]) -> None:
        """Decode the FrameRefs and start fetching; the infer thread takes the batch once fetched."""
        if self._fatal is not None:
            return  # stopping: what is left is neither produced nor committed
        self._wait_for_room()
        frames = []
        for m in items:
            k = _key(m)
            st = self.parts.get(k)
            if st is None or st.rewound_to is not None:
                continue
            try:
                frames.append(Frame(m, k, st.epoch, deserialize("frame_ref", m.value(), m.headers())))
            except SchemaError as exc:
                frames.append(Frame(m, k, st.epoch, None, str(exc)))
        if not frames:
            return
        job = Job(frames, _now_us(), time.perf_counter())
        self._inflight.append(job)
        self.metrics.batches_in_flight.set(len(self._inflight))
        # the detector's letterbox/normalise step runs in the fetch pool, off the infer thread (not when
        # tiling: the tiler cuts the full-resolution image itself)
        self.pipeline.submit(job, prepare=self.tile is None)

    # ---- stage 4 (poll thread): complete batches in order ---------------------------------------------
    def _complete_ready(self) -> None:
        while self._inflight and self._inflight[0].done.is_set():
            job = self._inflight.popleft()
            self.metrics.batches_in_flight.set(len(self._inflight))
            if job.crash is not None:
                self._fatal = WorkerError(f"batch failed in the worker itself: {type(job.crash).__name__}: {job.crash}")
                return
            if self.exactly_once:
                self._complete_in_txn(job)
            else:
                self._complete(job)

    def _current(self, frames: Sequence[Frame]) -> list[Frame]:
        """Frames whose partition is still ours and was not rewound since they were consumed."""
        return [f for f in frames if (st := self.parts.get(f.key)) is not None and st.epoch == f.epoch]

    def _complete(self, job: Job) -> None:
        """Dead letters, rewinds and inspections of one batch, top to bottom."""
        if self._fatal is not None:
            return
        frames = self._current(job.frames)
        if not frames:
            return
        rewind_at = self._store_rewinds(frames)
        inferred = job.inferred
        failed_model = inferred is not None and inferred.all_failed
        if failed_model:
            assert inferred is not None
            rewind_at |= self._on_model_failure(job, inferred)
        elif inferred is not None:
            self._inference_failures = 0
        self._dead_letter_bad_input(frames, rewind_at)
        if inferred is not None and not failed_model:
            self._emit(job, inferred)  # good frames are all before the rewind points
        for k, (off, reason, why) in sorted(rewind_at.items()):
            self._rewind(k, off, why, reason=reason)
        self._poll_producer()

    def _store_rewinds(self, frames: Sequence[Frame]) -> dict[PartKey, tuple[int, str, str]]:
        """Partition -> (first offset whose read failed transiently, reason, why): waited out, never DLQ'd."""
        out: dict[PartKey, tuple[int, str, str]] = {}
        for f in frames:
            r = f.fetched
            if r is not None and r.error is not None and r.error.transient and \
                    (f.key not in out or f.msg.offset() < out[f.key][0]):
                out[f.key] = (f.msg.offset(), "store_unavailable", f"object store unavailable ({r.error})")
        for k, st in self.parts.items():
            if k not in out and st.store_down and any(f.key == k for f in frames):
                st.store_down = False  # reads of this partition work again
                self.metrics.store_unavailable.set(sum(s.store_down for s in self.parts.values()))
                log.info("object store reachable again", extra=self.log_extra | {"partition": st.label})
        return out

    def _on_model_failure(self, job: Job, inferred: Inferred) -> dict[PartKey, tuple[int, str, str]]:
        """The model failed on every frame. If it still runs on a probe image the frames are at fault:
        retry them ``max_frame_retries`` times, then dead-letter them. Otherwise the model is broken:
        rewind and retry; after ``max_inference_failures`` such batches in a row, stop."""
        out: dict[PartKey, tuple[int, str, str]] = {}
        last = inferred.results[-1]
        err = f"{type(last).__name__}: {last}"
        det = inferred.model
        good = self._current(job.good)
        if inferred.model_ok:
            for f in good:
                if f.key in out:
                    continue
                st = self.parts[f.key]
                tries = st.retries if st.retry_offset == f.msg.offset() else 0
                if tries < self.max_frame_retries:
                    st.count_retry(f.msg.offset())
                    out[f.key] = (f.msg.offset(), "inference_retry",
                                  f"inference failed on a frame ({err}); retry {tries + 1}/{self.max_frame_retries}")
            for f, res in zip(job.good, inferred.results, strict=True):
                st = self.parts.get(f.key)
                if st is not None and st.epoch == f.epoch and f.key not in out and f.ref is not None:
                    self._dead_letter(f.msg, "inference_error", f"{type(res).__name__}: {res} (the model runs on "
                                      f"other images; gave up after {self.max_frame_retries} retries)",
                                      f.ref.get("frame_id"))
            return out
        self._inference_failures += 1
        log.error("inference failed for every frame of the batch", extra=self.log_extra | {
            "model_name": det.name, "model_version": det.version, "batch_size": len(good),
            "consecutive": self._inference_failures, "error": err})
        if self._inference_failures >= self.max_inference_failures and self._fatal is None:
            self._fatal = WorkerError(
                f"model {det.name} v{det.version} failed on every frame of {self._inference_failures} "
                f"batches in a row ({err}); stopping without committing them")
        for f in good:
            if f.key not in out:
                out[f.key] = (f.msg.offset(), "model_failure", "inference failed for every frame of the batch")
        return out

    def _dead_letter_bad_input(self, frames: Sequence[Frame], rewind_at: dict[PartKey, tuple[int, str, str]]) -> None:
        """Undecodable FrameRefs and frames that cannot be fetched or decoded, in source order."""
        for f in frames:
            if f.key in rewind_at and f.msg.offset() >= rewind_at[f.key][0]:
                continue
            if f.ref is None:
                self._dead_letter(f.msg, UNDECODABLE, f.why, None)
            elif f.fetched is not None and f.fetched.error is not None:
                self._dead_letter(f.msg, f.fetched.error.error_type, str(f.fetched.error), f.ref.get("frame_id"))

    def _emit(self, job: Job, inferred: Inferred) -> None:
        """Produce the record of every good frame still wanted (or a dead letter for a frame without one)."""
        out = inferred.out
        self.stats.batches += 1
        self.stats.prepared_batches += out.prepared_used
        self.metrics.batches.inc()
        self.metrics.batch_size.observe(len(job.good))
        self.metrics.stage_ms.labels("fetch_decode").observe(job.fetch_wall_ms)
        self.metrics.stage_ms.labels("infer").observe(out.infer_ms)
        self.metrics.stage_ms.labels("postprocess").observe(out.post_ms)
        if out.segment_ms:
            self.metrics.stage_ms.labels("segment").observe(sum(out.segment_ms))
        for f, rec in zip(job.good, inferred.records, strict=True):
            st = self.parts.get(f.key)
            if st is None or st.epoch != f.epoch:
                continue  # rewound or revoked since: consumed again later
            assert f.ref is not None
            if isinstance(rec, Exception):
                kind = "inspection_error" if isinstance(rec, RecordError) else "inference_error"
                self._dead_letter(f.msg, kind, f"{type(rec).__name__}: {rec}", f.ref.get("frame_id"))
                continue
            self._produce_inspection(f, rec)

    def _produce_inspection(self, f: Frame, rec: dict[str, Any]) -> None:
        """Stamp the record's production time, serialise and produce it."""
        assert f.ref is not None
        ref, m = f.ref, f.msg
        now = _now_us()
        total_ms = max(0.0, (now - int(ref["captured_at"])) / 1000)
        rec["inspected_at"] = now
        rec["timings"]["total_ms"] = round(total_ms, 3)
        try:
            value, headers = serialize("inspection", rec)
        except Exception as exc:  # never a crash loop on one frame: it goes to the DLQ instead
            self._dead_letter(m, "inspection_error", f"{type(exc).__name__}: {exc}", ref.get("frame_id"))
            return
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

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
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

    def _dead_letter(self, m: Message, error_type: str, error_message: str, frame_id: str | None) -> None:
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
