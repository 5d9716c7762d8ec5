r"""The inference worker: frames topic -> micro-batch -> fetch + decode -> detect (+ masks) -> verdict ->
inspections / DLQ.

One member of the ``inference-workers`` consumer group, run as overlapped stages joined by bounded
hand-offs::

    poll thread         fetch pool (N threads)     infer thread                          poll thread
    consume -> batch -> fetch + decode + stats  ->  FrameDetector (boxes + masks, 1 run)  -> produce,
                        + letterbox to tensor       -> verdict (once) -> record              store offsets
                 \__________ at most ``pipeline_depth`` batches in flight, completed in order __________/

The class is split along its seams, one module each:

- this module: lifecycle, the poll loop, dispatch and in-order completion of batches;
- inference_workers/stages.py: the stage pipeline (fetch pool + infer thread), which turns a batch
  into finished records (inference_workers/inference.py: detector protocol, verdict, record);
- inference_workers/partitions.py: partition control (rebalance, rewind, pause, backoff);
- inference_workers/results.py: result/DLQ emission, offsets, transactions, the stall monitor.

While batch N is inferred, batch N+1 is fetched, decoded and turned into model input (letterbox,
RGB, scale) and the results of N-1 are produced: the infer thread stacks tensors, runs the model once
(a YOLOv8-seg model gives boxes and masks from that run), decides each verdict and builds the records.
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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from inference_workers.batching import MicroBatcher, OffsetTracker
from inference_workers.detector import Thresholds
from inference_workers.dlq import UNDECODABLE, DeadLetterPublisher
from inference_workers.fetch import DEFAULT_MAX_FRAME_BYTES, FrameFetcher
from inference_workers.inference import (
    ModelSwitch,
    RecordError,
    VerdictPolicy,
    served_model,
    shared_segmenter,
)
from inference_workers.partitions import PartitionControl, PartitionState, _key
from inference_workers.results import DELIVERY_TIMEOUT_MS, STOP_GRACE_S, ResultEmitter, WorkerError
from inference_workers.stages import Frame, Inferred, Job, PartKey, StagePipeline
from inference_workers.tiling import TiledDetector, TileSpec
from infra import kafka
from infra.kafka import KafkaException, Message
from infra.metrics import HealthServer, serve
from infra.objectstore import ObjectStore, open_store
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import RegistryUnavailable, SchemaError, deserialize

log = logging.getLogger(__name__)

DEFAULT_GROUP = "inference-workers"
STALL_PAUSE_S = 1.0  # pipeline full for this long: pause the partitions until it drains

_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)


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


def _now_us() -> int:
    return time.time_ns() // 1000


class InferenceWorker(PartitionControl, ResultEmitter):
    """A consumer-group member that turns FrameRefs into Inspections (see the module docstring)."""

    def __init__(self, settings: Settings, model_uri: str, thresholds: Thresholds | None = None,
                 max_batch: int | None = None, max_wait_ms: float | None = None, fetch_threads: int | None = None,
                 worker_id: str | None = None, *,
                 group_id: str = DEFAULT_GROUP, max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
                 model_poll_s: float = 30.0, store: ObjectStore | None = None,
                 rewind_backoff_s: tuple[float, float] | None = None, max_frame_retries: int = 2,
                 max_inference_failures: int = 5, pipeline_depth: int | None = None,
                 delivery_timeout_ms: int = DELIVERY_TIMEOUT_MS, registry: CollectorRegistry | None = None,
                 tile: TileSpec | None = None, delivery: str | None = None) -> None:
        """Everything not given comes from ``settings`` (SQIS_WORKER_MAX_BATCH, _MAX_WAIT_MS,
        _FETCH_THREADS, _PIPELINE_DEPTH, _DELIVERY, ...); the keywords are overrides (tests, the CLI)."""
        max_batch = settings.worker_max_batch if max_batch is None else max_batch
        max_wait_ms = settings.worker_max_wait_ms if max_wait_ms is None else max_wait_ms
        fetch_threads = settings.worker_fetch_threads if fetch_threads is None else fetch_threads
        pipeline_depth = settings.worker_pipeline_depth if pipeline_depth is None else pipeline_depth
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
                                    check=lambda det: self.models.build(det))
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
        from inference_workers.review import ReviewPolicy

        self.pipeline = StagePipeline(self.fetcher, self.models, lambda: self.watcher.current, self.policy,
                                      depth=pipeline_depth, worker_id=self.worker_id, store=self.store,
                                      review=ReviewPolicy.from_settings(settings))
        from inference_workers.challenger import attach  # shadow + canary hooks (None: no challenger)

        self.challenger = attach(self, model_uri)
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
        if self.challenger is not None:
            self.challenger.start()
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

    def _on_denied(self, line: str) -> None:
        """The broker rejected the credentials: stop with that one line (retrying cannot help)."""
        if self._fatal is None:
            self._fatal = WorkerError(line)

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
            if self.challenger is not None:
                self.challenger.close()
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

    # ---- backpressure -----------------------------------------------------------------------------

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
            except RegistryUnavailable as exc:  # the record is fine, the registry is not: wait, never DLQ
                self._rewind(k, m.offset(), f"schema registry unavailable ({exc})", reason="registry_unavailable")
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



