"""The inference worker: frames topic -> micro-batch -> fetch + decode -> detect -> inspections / DLQ.

One member of the ``inference-workers`` consumer group. Every consumed FrameRef ends as exactly
one Inspection or one DeadLetter record (at least once); its offset is stored only after the
broker acknowledged that record, in order per partition, and committed on an interval plus a
final synchronous commit. A transient object-store outage is not the frame's fault: the
partition is rewound to that frame and paused for a backoff instead of dead-lettering it (up to
``max_rewinds`` times per offset). So is a batch on which the model fails for every frame (the
model or runtime is broken, not the frames); after ``max_inference_failures`` such batches in a
row the worker stops with an error, without committing past them.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from inference_workers.batching import MicroBatcher, OffsetTracker
from inference_workers.detector import Detection, Thresholds
from inference_workers.dlq import UNDECODABLE, DeadLetterPublisher, source_of
from inference_workers.fetch import DEFAULT_MAX_FRAME_BYTES, FetchResult, FrameFetcher
from inference_workers.tiling import TiledDetector, TileSpec
from inference_workers.verdict import FAIL, Timings, build_inspection
from infra import kafka
from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.objectstore import ObjectStore, open_store
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import SchemaError, deserialize, serialize

log = logging.getLogger(__name__)

DEFAULT_GROUP = "inference-workers"

_MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)
FRAMES = Counter("sqis_worker_frames_total", "frames handled", ["outcome"])  # inspected | dlq
VERDICTS = Counter("sqis_worker_verdicts_total", "inspections by verdict", ["verdict"])
BATCHES = Counter("sqis_worker_batches_total", "batches run through the detector")
DLQ = Counter("sqis_worker_dlq_total", "dead-lettered frames", ["error_type"])
REWINDS = Counter("sqis_worker_partition_rewinds_total", "partitions rewound after a transient store outage")
BATCH_SIZE = Histogram("sqis_worker_batch_size", "frames per detector batch", buckets=(1, 2, 4, 8, 16, 32, 64))
STAGE_MS = Histogram("sqis_worker_stage_ms", "per-batch stage wall time (ms)", ["stage"], buckets=_MS_BUCKETS)
LATENCY_MS = Histogram("sqis_worker_latency_ms", "captured_at -> inspection produced (ms)", buckets=_MS_BUCKETS)
MODEL_RELOADS = Counter("sqis_worker_model_reloads_total", "detector hot swaps")
IN_FLIGHT = Gauge("sqis_worker_in_flight", "consumed messages whose result is not acknowledged yet")

PartKey = tuple[str, int]


class WorkerError(RuntimeError):
    """The worker cannot go on (a result could not be delivered, the broker failed)."""


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
    dlq_by_type: dict[str, int] = field(default_factory=dict)


@dataclass
class _Inferred:
    """The detector's output for one batch: per frame, detections or the exception it raised."""

    det: Any
    results: list[list[Detection] | Exception]
    infer_ms: float
    post_ms: float


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
                 rewind_backoff_s: tuple[float, float] = (0.5, 10.0), max_rewinds: int = 20,
                 max_inference_failures: int = 5, tile: TileSpec | None = None) -> None:
        from inference_workers.model_loader import ModelWatcher

        self.settings = settings
        self.thresholds = thresholds or Thresholds()
        self.tile = tile  # run each frame as overlapping tiles (inference_workers/tiling.py); still one Inspection
        self.max_batch = max_batch
        self.group_id = group_id
        self.worker_id = worker_id or f"{socket.gethostname()}-{os.getpid()}"
        self.catalog = TopicCatalog(settings.topic_prefix)
        # The model first: a worker that cannot load one fails here, before it joins the group.
        self.watcher = ModelWatcher(settings, model_uri, thresholds, poll_s=model_poll_s)  # None: calibrated
        if hasattr(self.watcher.current, "warmup"):
            self.watcher.current.warmup(max_batch)
        self.store = store or open_store(settings)
        self.fetcher = FrameFetcher(self.store, fetch_threads, max_frame_bytes=max_frame_bytes)
        self.batcher: MicroBatcher[Message] = MicroBatcher(max_batch, max_wait_ms)
        self.offsets: OffsetTracker[PartKey] = OffsetTracker()
        self.stats = WorkerStats()
        self._stop = threading.Event()
        self._fatal: Exception | None = None
        self._assigned: set[PartKey] = set()
        self._rewound: dict[PartKey, int] = {}  # partition -> offset it was rewound to (skip stale msgs)
        self._paused: dict[PartKey, float] = {}  # partition -> monotonic time to resume
        self._rewind_delay: dict[PartKey, float] = {}
        self._rewind_backoff = rewind_backoff_s
        self.max_rewinds = max_rewinds  # store-outage rewinds of one offset before it is dead-lettered
        self._rewind_tries: dict[PartKey, tuple[int, int]] = {}  # partition -> (offset rewound to, times)
        self.max_inference_failures = max_inference_failures
        self._inference_failures = 0  # consecutive batches on which the model failed for every frame
        self._consumer: kafka.Consumer | None = None
        self._producer: kafka.Producer | None = None
        self._dlq: DeadLetterPublisher | None = None
        self._metrics_server: Any = None

    # ---- lifecycle -----------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the loop to finish the batch, flush, commit and close (signal-handler safe)."""
        self._stop.set()

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
        self._producer = kafka.producer(self.settings, client_id=self.worker_id)
        self._consumer = kafka.consumer(self.settings, group_id=self.group_id, client_id=self.worker_id,
                                        **{"fetch.wait.max.ms": 50})
        self._dlq = DeadLetterPublisher(self._producer, self.catalog.frames_dlq, self.worker_id)
        det = self.watcher.current
        log.info("worker starting", extra=self.log_extra | {
            "group": self.group_id, "topic": self.catalog.frames, "model_name": det.name,
            "model_version": det.version, "max_batch": self.max_batch})
        self._consumer.subscribe([self.catalog.frames], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        try:
            self._loop()
            if self._fatal is None:
                last = self.batcher.flush()
                if last is not None:
                    self._process(last.items)
        finally:
            self._shutdown()
        if self._fatal is not None:
            raise WorkerError(str(self._fatal)) from self._fatal
        return self.stats

    def _loop(self) -> None:
        assert self._consumer is not None and self._producer is not None
        c, p = self._consumer, self._producer
        while not self._stop.is_set() and self._fatal is None:
            self._resume_due()
            left = self.batcher.time_left()
            if left is None:
                # No open batch: poll returns as soon as one message is there, then drain what is buffered.
                first = c.poll(1.0)
                msgs = [first] if first is not None else []
                if first is not None and self.max_batch > 1:
                    msgs += c.consume(num_messages=self.max_batch - 1, timeout=0)
            else:
                msgs = c.consume(num_messages=max(1, self.batcher.room), timeout=min(1.0, left))
            for m in msgs:
                if not self._accept(m):
                    continue
                self.offsets.track(_key(m), m.offset())
                self.stats.consumed += 1
                for b in self.batcher.add(m):
                    self._process(b.items)
            due = self.batcher.poll()
            if due is not None:
                self._process(due.items)
            p.poll(0)
            self._store_ready()
            if self.watcher.maybe_reload():  # pending items are inspected by the new model
                self.stats.model_reloads += 1
                MODEL_RELOADS.inc()

    def _accept(self, m: Message) -> bool:
        """False for errors, revoked partitions and stale messages after a rewind."""
        err = m.error()
        if err is not None:
            if err.code() == KafkaError._PARTITION_EOF:
                return False
            log.error("consumer error", extra=self.log_extra | {"error": str(err)})
            if err.fatal():
                self._fatal = KafkaException(err)
            return False
        k = _key(m)
        if k not in self._assigned:
            return False
        rewound = self._rewound.get(k)
        if rewound is not None:
            if m.offset() < rewound:
                return False
            if m.offset() > rewound:
                return False  # fetched before the seek; the rewound offset comes again
            del self._rewound[k]
        return True

    def _shutdown(self) -> None:
        c, p = self._consumer, self._producer
        try:
            if p is not None:
                left = p.flush(30)
                if left:
                    log.error("results not delivered at shutdown", extra=self.log_extra | {"in_queue": left})
            self._store_ready()
            if c is not None:
                self._commit()
        finally:
            if c is not None:
                c.close()  # runs on_revoke: already flushed and committed, so it is quick
            if p is not None:
                p.close()
            self._consumer = self._producer = self._dlq = None
            self.fetcher.close()
            if hasattr(self.watcher, "close"):
                self.watcher.close()
            if isinstance(self._metrics_server, tuple):  # prometheus_client >= 0.20: (server, thread)
                self._metrics_server[0].shutdown()
                self._metrics_server = None
            log.info("worker stopped", extra=self.log_extra | {
                "consumed": self.stats.consumed, "inspected": self.stats.inspected,
                "dead_lettered": self.stats.dead_lettered, "batches": self.stats.batches})

    def _serve_metrics(self) -> None:
        port = self.settings.metrics_port
        if port is None:
            return
        from prometheus_client import start_http_server

        try:
            self._metrics_server = start_http_server(port)
            log.info("serving /metrics", extra=self.log_extra | {"port": port})
        except OSError as exc:
            log.warning("cannot serve /metrics", extra=self.log_extra | {"port": port, "error": str(exc)})

    # ---- rebalance -----------------------------------------------------------------------------
    def _on_assign(self, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        self._assigned |= {(tp.topic, tp.partition) for tp in partitions}
        log.info("partitions assigned", extra=self.log_extra | {
            "partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    def _on_revoke(self, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        """Hand the partitions back with minimal duplicates: drop unprocessed, flush, store, commit."""
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop_pending(keys)
        if self._producer is not None:
            self._producer.flush(10)
        self._store_ready()
        offsets = [TopicPartition(t, p, o) for (t, p) in keys if (o := self.offsets.committable((t, p))) is not None]
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
        dropped = self.batcher.drop(lambda m: _key(m) in keys)
        for m in dropped:
            self.offsets.untrack_from(_key(m), m.offset())
        return len(dropped)

    def _resume_paused(self, consumer: kafka.Consumer, keys: set[PartKey]) -> None:
        """Resume our paused partitions among ``keys`` while still assigned: the client keeps the pause
        flag across a reassignment, so a partition paused now could otherwise never resume."""
        paused = [TopicPartition(t, p) for (t, p) in sorted(keys) if (t, p) in self._paused]
        if not paused:
            return
        try:
            consumer.resume(paused)
        except KafkaException as exc:
            log.warning("cannot resume paused partitions on revoke", extra=self.log_extra | {
                "partitions": [f"{tp.topic}[{tp.partition}]" for tp in paused], "error": str(exc)})

    def _forget(self, keys: set[PartKey]) -> None:
        self.offsets.forget(keys)
        self._assigned -= keys
        for k in keys:
            self._rewound.pop(k, None)
            self._paused.pop(k, None)
            self._rewind_delay.pop(k, None)
            self._rewind_tries.pop(k, None)

    # ---- offsets -------------------------------------------------------------------------------
    def _ack(self, k: PartKey, offset: int, what: str, ident: str | None) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                log.error("result not delivered; stopping without storing its offset", extra=self.log_extra | {
                    "frame_id": ident, "source": f"{k[0]}[{k[1]}]@{offset}", "record": what, "error": str(err)})
                if self._fatal is None:
                    self._fatal = WorkerError(f"{what} for {k[0]}[{k[1]}]@{offset} not delivered: {err}")
                return
            self.stats.delivered += 1
            self.offsets.ack(k, offset)

        return on_delivery

    def _store_ready(self) -> None:
        ready = self.offsets.ready()
        IN_FLIGHT.set(self.offsets.in_flight())
        if not ready or self._consumer is None:
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

    # ---- rewind after a transient store outage or a failing model --------------------------------
    def _rewind(self, k: PartKey, offset: int, why: str) -> None:
        assert self._consumer is not None
        self.offsets.untrack_from(k, offset)
        self._drop_pending({k})
        lo, hi = self._rewind_backoff
        delay = min(hi, self._rewind_delay.get(k, lo / 2) * 2)
        self._rewind_delay[k] = delay
        tp = TopicPartition(k[0], k[1], offset)
        try:
            self._consumer.pause([tp])
            self._consumer.seek(tp)
        except KafkaException as exc:
            # the partition cannot be rewound in place: stop; the committed offset is still correct
            self._fatal = WorkerError(f"cannot rewind {k[0]}[{k[1]}] to {offset}: {exc}")
            return
        self._rewound[k] = offset
        self._paused[k] = time.monotonic() + delay
        self.stats.rewinds += 1
        REWINDS.inc()
        log.warning(f"{why}; partition rewound and paused", extra=self.log_extra | {
            "source": f"{k[0]}[{k[1]}]@{offset}", "pause_s": delay})

    def _resume_due(self) -> None:
        if not self._paused or self._consumer is None:
            return
        now = time.monotonic()
        due = [k for k, t in self._paused.items() if t <= now]
        if due:
            self._consumer.resume([TopicPartition(t, p) for t, p in due])
            for k in due:
                del self._paused[k]

    # ---- one batch -----------------------------------------------------------------------------
    def _process(self, items: Sequence[Message]) -> None:
        """FrameRefs -> fetch + decode in parallel -> one detector call -> produce results."""
        assert self._producer is not None and self._dlq is not None
        if self._fatal is not None:
            return  # stopping: what is left is neither produced nor committed
        items = [m for m in items if _key(m) in self._assigned and _key(m) not in self._rewound]
        if not items:
            return
        batch_start_us = _now_us()
        decoded: list[tuple[Message, dict[str, Any] | None, str]] = []
        for m in items:
            try:
                decoded.append((m, deserialize("frame_ref", m.value(), m.headers()), ""))
            except SchemaError as exc:
                decoded.append((m, None, str(exc)))
        frames = [(m, ref) for m, ref, _ in decoded if ref is not None]

        t0 = time.perf_counter()
        results = self.fetcher.fetch_all([ref for _, ref in frames]) if frames else []
        fetch_wall_ms = (time.perf_counter() - t0) * 1000
        fetched = {id(m): r for (m, _), r in zip(frames, results, strict=True)}

        # A transient store outage rewinds the partition to its first such frame; later messages of
        # that partition are left for the retry so offsets stay in order. An offset rewound
        # max_rewinds times already is dead-lettered instead, so one unreadable object cannot stall it forever.
        rewind_at: dict[PartKey, int] = {}
        gave_up: set[int] = set()  # id() of frames dead-lettered as store_unavailable
        for (m, _), r in zip(frames, results, strict=True):
            if r.error is not None and r.error.transient:
                k = _key(m)
                off, tries = self._rewind_tries.get(k, (-1, 0))
                if off == m.offset() and tries >= self.max_rewinds:
                    gave_up.add(id(m))
                else:
                    rewind_at[k] = min(rewind_at.get(k, m.offset()), m.offset())
        store_rewinds = dict(rewind_at)
        good: list[tuple[Message, dict[str, Any], FetchResult]] = []
        for m, ref, _ in decoded:  # source order
            k = _key(m)
            if ref is not None and fetched[id(m)].error is None and not (k in rewind_at and m.offset() >= rewind_at[k]):
                good.append((m, ref, fetched[id(m)]))
        inferred = self._infer(good) if good else None
        if good and inferred is None:
            # The model failed on every frame: it or the runtime is broken, not the frames. Like a store
            # outage: rewind, pause, retry; stop after too many such batches in a row.
            for m, _, _ in good:
                k = _key(m)
                rewind_at[k] = min(rewind_at.get(k, m.offset()), m.offset())
        for m, ref, why in decoded:  # dead letters, in source order, before the rewind points
            k = _key(m)
            if k in rewind_at and m.offset() >= rewind_at[k]:
                continue
            if ref is None:
                self._dead_letter(m, UNDECODABLE, why, None)
                continue
            r = fetched[id(m)]
            if r.error is not None:
                msg = str(r.error)
                if id(m) in gave_up:
                    msg += f" (gave up after {self.max_rewinds} rewinds)"
                self._dead_letter(m, r.error.error_type, msg, ref.get("frame_id"))
        for k, off in rewind_at.items():
            if k in store_rewinds and store_rewinds[k] == off:
                prev_off, tries = self._rewind_tries.get(k, (-1, 0))
                self._rewind_tries[k] = (off, tries + 1 if prev_off == off else 1)
                self._rewind(k, off, "object store unavailable")
            else:
                self._rewind(k, off, "inference failed for every frame of the batch")
        if inferred is not None:
            self._emit(good, inferred, batch_start_us, fetch_wall_ms)
        self._producer.poll(0)

    def _infer(self, good: list[tuple[Message, dict[str, Any], FetchResult]]) -> _Inferred | None:
        """Run the detector on the batch; frame by frame if the batch fails. None if every frame failed."""
        det: Any = self.watcher.current
        if self.tile is not None:
            det = TiledDetector(det, self.tile)
        images = [r.image for _, _, r in good]
        t0 = time.perf_counter()
        try:
            if hasattr(det, "preprocess") and hasattr(det, "infer") and hasattr(det, "postprocess"):
                arr, metas = det.preprocess(images)
                raw = det.infer(arr)
                t1 = time.perf_counter()
                results: list[list[Detection] | Exception] = list(det.postprocess(raw, metas))
            else:
                results = list(det.detect(images))
                t1 = time.perf_counter()
        except Exception as exc:
            # Isolate the frame(s) the model cannot run on; the others are still inspected.
            log.warning("batch inference failed; retrying frame by frame", extra=self.log_extra | {
                "error": f"{type(exc).__name__}: {exc}", "batch_size": len(images)})
            t0 = time.perf_counter()
            results = []
            for img in images:
                try:
                    results.append(det.detect([img])[0] if len(images) > 1 else exc)
                except Exception as one_exc:
                    results.append(one_exc)
            t1 = time.perf_counter()
            if all(isinstance(x, Exception) for x in results):
                self._inference_failures += 1
                last = results[-1]
                log.error("inference failed for every frame of the batch", extra=self.log_extra | {
                    "model_name": det.name, "model_version": det.version, "batch_size": len(images),
                    "consecutive": self._inference_failures, "error": f"{type(last).__name__}: {last}"})
                if self._inference_failures >= self.max_inference_failures and self._fatal is None:
                    self._fatal = WorkerError(
                        f"model {det.name} v{det.version} failed on every frame of {self._inference_failures} "
                        f"batches in a row ({type(last).__name__}: {last}); stopping without committing them")
                return None
        self._inference_failures = 0
        return _Inferred(det, results, (t1 - t0) * 1000, (time.perf_counter() - t1) * 1000)

    def _emit(self, good: list[tuple[Message, dict[str, Any], FetchResult]], inferred: _Inferred,
              batch_start_us: int, fetch_wall_ms: float) -> None:
        """Produce one Inspection per frame (or a dead letter for a frame the model failed on)."""
        assert self._producer is not None
        det, results, infer_ms, post_ms = inferred.det, inferred.results, inferred.infer_ms, inferred.post_ms
        n = len(good)
        self.stats.batches += 1
        BATCHES.inc()
        BATCH_SIZE.observe(n)
        STAGE_MS.labels("fetch_decode").observe(fetch_wall_ms)
        STAGE_MS.labels("infer").observe(infer_ms)
        STAGE_MS.labels("postprocess").observe(post_ms)
        thr = getattr(det, "thresholds", self.thresholds)
        for (m, ref, r), dets in zip(good, results, strict=True):
            if isinstance(dets, Exception):
                self._dead_letter(m, "inference_error", f"{type(dets).__name__}: {dets}", ref.get("frame_id"))
                continue
            assert r.image is not None
            now = _now_us()
            captured = int(ref["captured_at"])
            timings = Timings(
                queue_ms=max(0.0, (batch_start_us - captured) / 1000), fetch_ms=r.fetch_ms, decode_ms=r.decode_ms,
                infer_ms=infer_ms, postprocess_ms=post_ms, total_ms=max(0.0, (now - captured) / 1000))
            try:
                rec = build_inspection(
                    ref, detections=dets, thresholds=thr, model_name=det.name, model_version=det.version,
                    timings=timings, inspected_at_us=now, batch_size=n, worker_id=self.worker_id,
                    source_partition=m.partition(), source_offset=m.offset(),
                    width=r.image.shape[1], height=r.image.shape[0])
                value, headers = serialize("inspection", rec)
            except Exception as exc:  # never a crash loop on one frame: it goes to the DLQ instead
                self._dead_letter(m, "inspection_error", f"{type(exc).__name__}: {exc}", ref.get("frame_id"))
                continue
            self._produce(self.catalog.inspections, ref["camera_id"].encode(), value, headers,
                          self._ack(_key(m), m.offset(), "inspection", ref["frame_id"]))
            self.stats.inspected += 1
            FRAMES.labels("inspected").inc()
            VERDICTS.labels(rec["verdict"]).inc()
            LATENCY_MS.observe(timings.total_ms)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("frame inspected", extra=self.log_extra | {
                    "frame_id": ref["frame_id"], "source": source_of(m), "verdict": rec["verdict"],
                    "detections": len(dets), "failed": rec["verdict"] == FAIL})

    def _produce(self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]],
                 on_delivery: Callable[[KafkaError | None, Message], None]) -> None:
        assert self._producer is not None
        while True:
            try:
                self._producer.produce(topic, value=value, key=key, headers=headers, on_delivery=on_delivery)
                return
            except BufferError:
                self._producer.poll(0.1)  # local queue full: let deliveries drain

    def _dead_letter(self, m: Message, error_type: str, error_message: str, frame_id: str | None) -> None:
        assert self._dlq is not None and self._producer is not None
        cb = self._ack(_key(m), m.offset(), "dead letter", frame_id)
        while True:
            try:
                self._dlq.publish(m, error_type=error_type, error_message=error_message, frame_id=frame_id,
                                  on_delivery=cb)
                break
            except BufferError:
                self._producer.poll(0.1)
        self.stats.dead_lettered += 1
        self.stats.dlq_by_type[error_type] = self.stats.dlq_by_type.get(error_type, 0) + 1
        FRAMES.labels("dlq").inc()
        DLQ.labels(error_type).inc()
