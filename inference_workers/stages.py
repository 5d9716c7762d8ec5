"""The worker's stage pipeline: batch in flight -> fetch + decode (pool) -> infer -> finish -> records.

    poll thread: submit() -> fetch pool: fetch, decode, letterbox
        -> infer thread: FrameDetector.detect_batch (one forward pass, the boxes)
        -> finish thread: FrameDetector.finish (masks from that pass) -> VerdictPolicy.decide (once)
           -> Inspection record

The finish thread overlaps a batch's masks and records with the next batch's forward pass.

The stages return finished records (or, per frame, the reason there is none); the poll thread
only checks they are still wanted (partition epochs), serialises, produces and commits them
(inference_workers/worker.py). At most ``depth`` batches are in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from inference_workers.fetch import FetchResult, FrameFetcher
from inference_workers.inference import (
    BatchOutput,
    FrameDetector,
    ModelSwitch,
    RecordError,
    VerdictPolicy,
    inspection_record,
    store_label,
)
from inference_workers.review import ReviewPolicy
from inference_workers.verdict import ImageStats, Timings
from infra.kafka import Message

log = logging.getLogger(__name__)

PartKey = tuple[str, int]


@dataclass
class Frame:
    """One consumed message of a batch on its way through the stages."""

    msg: Message
    key: PartKey
    epoch: int
    ref: dict[str, Any] | None
    why: str = ""  # why ref is None (undecodable FrameRef)
    future: Future[FetchResult] | None = None
    fetched: FetchResult | None = None
    review: list[tuple[str, bytes]] = field(default_factory=list)  # active-learning marks (Kafka headers)


@dataclass
class Inferred:
    """A batch through the served model: per good frame its record, or the exception that stopped it."""

    model: FrameDetector
    out: BatchOutput
    records: list[dict[str, Any] | Exception]

    @property
    def results(self) -> list[Any]:
        return self.out.results

    @property
    def all_failed(self) -> bool:
        return self.out.all_failed

    @property
    def model_ok(self) -> bool:
        return self.out.model_ok


@dataclass
class Job:
    """A batch in flight: dispatched by the poll thread, fetched by the pool, inferred by the infer thread."""

    frames: list[Frame]
    start_us: int
    t0: float
    done: threading.Event = field(default_factory=threading.Event)
    fetch_wall_ms: float = 0.0
    good: list[Frame] = field(default_factory=list)
    inferred: Inferred | None = None
    crash: BaseException | None = None


def good_frames(frames: Sequence[Frame]) -> list[Frame]:
    """Frames to infer: fetched and decoded, and not at or after a transient store failure of their
    partition in this batch (those are retried from that offset, in order)."""
    first_transient: dict[PartKey, int] = {}
    for f in frames:
        r = f.fetched
        if r is not None and r.error is not None and r.error.transient:
            first_transient[f.key] = min(first_transient.get(f.key, f.msg.offset()), f.msg.offset())
    return [f for f in frames if f.fetched is not None and f.fetched.error is None
            and not (f.key in first_transient and f.msg.offset() >= first_transient[f.key])]


class StagePipeline:
    """Fetch pool + infer thread for batches the poll thread dispatches; completion stays with the caller."""

    def __init__(self, fetcher: FrameFetcher, models: ModelSwitch, current: Callable[[], Any],
                 policy: VerdictPolicy, *, depth: int, worker_id: str, store: Any = None,
                 review: ReviewPolicy | None = None) -> None:
        if depth < 1:
            raise ValueError("pipeline_depth must be >= 1")
        self.fetcher = fetcher
        self.models = models
        self.current = current  # the detector the model watcher holds now
        self.policy = policy
        self.review = review if review is not None and review.active else None
        self.store = store
        self.depth = depth
        self.worker_id = worker_id
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=depth)
        self._finishing: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=depth)
        self._threads: list[threading.Thread] = []
        # hooks (inference_workers/challenger.py): canary routing of a batch's frames, shadow after records
        self.route: Callable[[Job, FrameDetector], FrameDetector] | None = None
        self.on_finished: Callable[[Job, list[Any], FrameDetector], None] | None = None

    def served(self) -> FrameDetector:
        return self.models.served(self.current())

    def start(self, name: str) -> None:
        self._threads = [threading.Thread(target=self._infer_loop, name=name, daemon=True),
                         threading.Thread(target=self._finish_loop, name=f"{name}-finish", daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._queue.put(None)
        for t in self._threads:
            t.join(timeout=timeout)

    def submit(self, job: Job, prepare: bool) -> None:
        """Start fetching the job's frames (and making the model input in the pool) and queue it."""
        with_ref = [f for f in job.frames if f.ref is not None]
        fn = self.served().prepare if prepare else None
        futures = self.fetcher.submit([f.ref for f in with_ref if f.ref is not None], prepare=fn)
        for f, fut in zip(with_ref, futures, strict=True):
            f.future = fut
        self._queue.put(job)

    def _infer_loop(self) -> None:
        """Infer thread: wait for the fetches, one forward pass, the boxes; then hand over to finish."""
        while True:
            job = self._queue.get()
            if job is None:
                self._finishing.put(None)
                return
            try:
                self._finishing.put((job, *self.detect(job)))
            except BaseException as exc:  # never lose a batch: the poll thread reports it
                job.crash = exc
                job.done.set()

    def _finish_loop(self) -> None:
        """Finish thread: masks from the forward pass, the verdict (once), the records."""
        while True:
            item = self._finishing.get()
            if item is None:
                return
            job = item[0]
            try:
                self.finish(*item)
            except BaseException as exc:
                job.crash = exc
            finally:
                job.done.set()

    def run_job(self, job: Job) -> None:
        """Both halves in the calling thread (tests, tools)."""
        self.finish(job, *self.detect(job))

    def detect(self, job: Job) -> tuple[FrameDetector | None, list[Any], BatchOutput | None, Any]:
        for f in job.frames:
            if f.future is not None:
                f.fetched = f.future.result()
        job.fetch_wall_ms = (time.perf_counter() - job.t0) * 1000
        job.good = good_frames(job.frames)
        if not job.good:
            return None, [], None, None
        fetched = [f.fetched for f in job.good if f.fetched is not None]
        model = self.served()  # one read per batch: detector and segmenter of the same version
        if self.route is not None:  # canary: frames of the challenger's lines are served by it
            model = self.route(job, model)
        images = [r.image for r in fetched]
        out, forward = model.detect_batch(images, [r.prepared for r in fetched])
        for r in fetched:
            r.prepared = None  # the tensors are in the batch now; do not hold them twice
        return model, images, out, forward

    def finish(self, job: Job, model: FrameDetector | None, images: list[Any], out: BatchOutput | None,
               forward: Any) -> None:
        if model is None or out is None:
            return
        out = model.finish(images, out, forward)
        records: list[dict[str, Any] | Exception] = []
        if not out.all_failed:
            per_frame = getattr(model, "frame_model", None)  # a canary-routed batch: the frame's own model
            records = [res if isinstance(res, Exception) else
                       self._record(f, res, i, per_frame(i) if per_frame else model, out, job, forward)
                       for i, (f, res) in enumerate(zip(job.good, out.results, strict=True))]
        job.inferred = Inferred(model, out, records)
        if self.on_finished is not None and not out.all_failed:
            try:  # shadow: hands the batch to its own thread; never delays or fails the records
                self.on_finished(job, images, model)
            except Exception:
                log.exception("shadow hand-off failed", extra={"worker_id": self.worker_id})

    def _record(self, f: Frame, dets: Any, i: int, model: FrameDetector, out: BatchOutput,
                job: Job, forward: Any = None) -> dict[str, Any] | Exception:
        """The frame's verdict, decided once from its final detections, and its record (total_ms and
        inspected_at are set when it is produced)."""
        r, ref, m = f.fetched, f.ref, f.msg
        assert r is not None and ref is not None and r.image is not None
        try:
            decision = self.policy.decide(dets, model.thresholds, str(ref["camera_id"]))
            uri = store_label(self.store, ref, dets, out.labels[i] if out.labels else None)
            captured = int(ref["captured_at"])
            timings = Timings(queue_ms=max(0.0, (job.start_us - captured) / 1000), fetch_ms=r.fetch_ms,
                              decode_ms=r.decode_ms, infer_ms=out.infer_ms, postprocess_ms=out.post_ms, total_ms=0.0,
                              segment_ms=out.segment_ms[i] if out.segment_ms else 0.0)
            stats = None
            if r.stats is not None:
                top = out.max_scores[i]
                stats = ImageStats(*r.stats, max_score=top if top is not None else dets.max_confidence)
            rec = inspection_record(ref, dets, decision, model, timings=timings, inspected_at_us=0,
                                    batch_size=len(job.good), worker_id=self.worker_id,
                                    source_partition=m.partition(), source_offset=m.offset(),
                                    width=r.image.shape[1], height=r.image.shape[0], image_stats=stats, mask_uri=uri)
            f.review = self._marks(dets, i, model, forward) if self.review is not None else []
            return rec
        except Exception as exc:  # never a crash loop on one frame: it goes to the DLQ instead
            return RecordError(f"{type(exc).__name__}: {exc}")

    def _marks(self, dets: Any, i: int, model: FrameDetector, forward: Any) -> list[tuple[str, bytes]]:
        """The frame's active-learning marks as Kafka headers (inference_workers/review.py); a failure to
        mark never costs the record."""
        rp = self.review
        assert rp is not None
        try:
            cands = None
            find = getattr(model, "candidates", None)
            if find is not None and rp.band > 0:
                cands = find(forward, i, rp.band, rp.top_k)
            return rp.mark(dets, model.thresholds, cands).headers()
        except Exception:
            log.exception("review marking failed", extra={"worker_id": self.worker_id})
            return []
