"""The challenger in the worker: shadow inference and canary routing (issue #21 section 4).

A worker serving ``models:/NAME@production`` also follows ``models:/NAME@challenger`` (SQIS_CHALLENGER_ALIAS)
and the canary route of NAME (registered-model tag ``sqis.canary``, written by ``sqis model canary``):

- shadow: a sampled share (SQIS_SHADOW_SHARE, by frame id, so every worker samples the same frames) of the
  frames the production model served is run again through the challenger, on a thread of its own after the
  production records are made: off the verdict path and off the latency budget. Its Inspections go to
  ``inspections.shadow`` through a plain producer of its own (best effort: never in the transaction, never
  to MES). A full shadow queue drops the batch (counted), it never blocks the worker.
- canary: frames whose line is in the route (or whose camera falls in the route's share of cameras) are
  served by the challenger: their verdict is the challenger's, on ``inspections``. Only while the route's
  state is ``canary`` and names the challenger version this worker loaded.

No alias, no route: the worker is exactly the production worker. Hooks into the worker: :func:`attach`
sets ``StagePipeline.route`` / ``on_finished``; the worker starts and closes the returned object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from inference_workers.inference import BatchOutput, FrameDetector, inspection_record
from inference_workers.verdict import Timings

if TYPE_CHECKING:
    from inference_workers.stages import Frame, Job
    from infra.settings import Settings

log = logging.getLogger(__name__)

ROUTE_TAG = "sqis.canary"  # registered-model tag: the canary route (JSON, see Route)
SHADOW_QUEUE = 4  # batches waiting for the shadow thread; more are dropped


def bucket(key: str) -> float:
    """A stable number in [0, 1) for a key (frame id, camera id): the same on every worker and restart."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2.0 ** 64


@dataclass(frozen=True)
class Route:
    """Which frames the challenger serves: the lines named, plus a share of the cameras (by camera id)."""

    version: str  # the challenger version the route is for
    lines: frozenset[str] = frozenset()
    share: float = 0.0
    state: str = "canary"  # canary | rolled_back | promoted
    started_at: float = 0.0
    reason: str = ""
    expires_at: float = 0.0  # the controller's lease (wall clock); 0: none. An expired route serves nothing.

    def live(self, now: float | None = None) -> bool:
        """A canary route whose controller renewed its lease in time."""
        return self.state == "canary" and (not self.expires_at or (now or time.time()) < self.expires_at)

    def serves(self, line_id: str, camera_id: str) -> bool:
        return self.live() and (line_id in self.lines or (self.share > 0 and bucket(camera_id) < self.share))

    def to_json(self) -> str:
        return json.dumps({"version": self.version, "lines": sorted(self.lines), "share": self.share,
                           "state": self.state, "started_at": self.started_at, "reason": self.reason,
                           "expires_at": self.expires_at})

    @classmethod
    def from_json(cls, raw: str | None) -> Route | None:
        if not raw:
            return None
        try:
            d = json.loads(raw)
            return cls(str(d["version"]), frozenset(map(str, d.get("lines") or ())), float(d.get("share") or 0.0),
                       str(d.get("state") or "canary"), float(d.get("started_at") or 0.0), str(d.get("reason") or ""),
                       float(d.get("expires_at") or 0.0))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("unreadable canary route tag; no canary", extra={"error": str(exc)})
            return None


class RoutedBatch:
    """A FrameDetector for one batch whose frames are split between production and challenger: each
    group runs on its own model; the merged output keeps frame order; ``frame_model(i)`` names the model
    whose name, version and thresholds go into frame i's record."""

    def __init__(self, production: FrameDetector, challenger: FrameDetector, which: Sequence[bool]) -> None:
        self.production, self.challenger, self.which = production, challenger, list(which)
        self.name, self.version = production.name, production.version
        self.thresholds = production.thresholds
        self.segmenter_name = production.segmenter_name
        self.prepare = production.prepare

    def frame_model(self, i: int) -> FrameDetector:
        return self.challenger if self.which[i] else self.production

    def _groups(self) -> list[tuple[FrameDetector, list[int]]]:
        prod = [i for i, w in enumerate(self.which) if not w]
        chal = [i for i, w in enumerate(self.which) if w]
        return [(m, idx) for m, idx in ((self.production, prod), (self.challenger, chal)) if idx]

    def run(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()) -> BatchOutput:
        return self.finish(images, *self.detect_batch(images, prepared))

    def detect_batch(self, images: Sequence[np.ndarray], prepared: Sequence[Any] = ()) -> tuple[BatchOutput, Any]:
        parts = []
        for m, idx in self._groups():
            # the fetch pool made the production model's input; the challenger makes its own
            sub_prep = [prepared[i] for i in idx] if prepared and m is self.production else ()
            o, fwd = m.detect_batch([images[i] for i in idx], sub_prep)
            parts.append((m, idx, o, fwd))
        return self._merge(len(images), parts), parts

    def finish(self, images: Sequence[np.ndarray], out: BatchOutput, forward: Any) -> BatchOutput:
        parts = [(m, idx, m.finish([images[i] for i in idx], o, fwd), fwd) for m, idx, o, fwd in forward]
        merged = self._merge(len(images), parts)
        # a frame the challenger failed on is served by production instead (never dead-lettered for it)
        failed = [i for i, w in enumerate(self.which) if w and isinstance(merged.results[i], Exception)]
        if failed:
            log.warning("challenger failed on canary frames; production serves them", extra={
                "model_name": self.challenger.name, "model_version": self.challenger.version, "frames": len(failed)})
            redo = self.production.run([images[i] for i in failed])
            for j, i in enumerate(failed):
                self.which[i] = False
                merged.results[i], merged.max_scores[i] = redo.results[j], redo.max_scores[j]
                if merged.segment_ms and redo.segment_ms:
                    merged.segment_ms[i] = redo.segment_ms[j]
                if merged.labels and redo.labels:
                    merged.labels[i] = redo.labels[j]
            merged.all_failed = all(isinstance(r, Exception) for r in merged.results)
        return merged

    @staticmethod
    def _merge(n: int, parts: Sequence[tuple[FrameDetector, list[int], BatchOutput, Any]]) -> BatchOutput:
        results: list[Any] = [None] * n
        scores: list[float | None] = [None] * n
        seg = [0.0] * n
        labels: list[Any] = [None] * n
        any_seg = any_labels = False
        for _m, idx, o, _f in parts:
            for j, i in enumerate(idx):
                results[i], scores[i] = o.results[j], o.max_scores[j]
                if o.segment_ms:
                    seg[i], any_seg = o.segment_ms[j], True
                if o.labels:
                    labels[i], any_labels = o.labels[j], True
        outs = [p[2] for p in parts]
        return BatchOutput(results, scores, sum(o.infer_ms for o in outs), sum(o.post_ms for o in outs),
                           seg if any_seg else [], labels if any_labels else [],
                           prepared_used=any(o.prepared_used for o in outs),
                           all_failed=all(o.all_failed for o in outs),
                           model_ok=all(o.model_ok for o in outs if o.all_failed))


class _Metrics:
    """The challenger's Prometheus metrics, in the worker's registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter, Info

        self.shadow = Counter("sqis_worker_shadow_total", "frames through the challenger in shadow", ["outcome"],
                              registry=registry)
        self.canary = Counter("sqis_worker_canary_frames_total", "frames whose verdict the challenger gave (canary)",
                              registry=registry)
        self.info = Info("sqis_challenger", "the challenger version loaded (shadow / canary)", registry=registry)


@dataclass
class ChallengerStats:
    loads: int = 0
    shadowed: int = 0  # shadow inspections produced
    shadow_dropped: int = 0  # frames not shadowed because the shadow queue was full
    canary_frames: int = 0  # frames the challenger served (their verdict on inspections)
    errors: int = 0
    versions: list[str] = field(default_factory=list)


class Challenger:
    """Follows NAME@challenger and NAME's canary route (one registry call per poll), runs the shadow thread."""

    def __init__(self, settings: Settings, name: str, build: Callable[[Any], FrameDetector], *, worker_id: str,
                 policy: Any, thresholds: Any = None, poll_s: float | None = None, share: float | None = None,
                 registry: Any = None) -> None:
        self.settings = settings
        self.name = name
        self.alias = settings.challenger_alias
        self.build = build
        self.worker_id = worker_id
        self.policy = policy
        self.fixed_thresholds = thresholds  # None: each version at its own calibrated operating point
        self.poll_s = settings.challenger_poll_s if poll_s is None else poll_s
        self.share = settings.shadow_share if share is None else share
        self.stats = ChallengerStats()
        self._served: FrameDetector | None = None
        self._route: Route | None = None
        self._client: Any = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._queue: queue.Queue[tuple[FrameDetector, list[Frame], list[np.ndarray], int] | None] = \
            queue.Queue(maxsize=SHADOW_QUEUE)
        self._producer: Any = None
        self._metrics = _Metrics(registry) if registry is not None else None

    # ---- the registry -------------------------------------------------------------------------------
    @property
    def served(self) -> FrameDetector | None:
        """The challenger as served now, or None (no alias)."""
        return self._served

    @property
    def route(self) -> Route | None:
        return self._route

    def poll(self) -> None:
        """One look at the registry: the alias's version (loaded when new) and the route; never raises."""
        from inference_workers.model_loader import default_thresholds, download_version, mlflow_client

        try:
            if self._client is None:
                self._client = mlflow_client(self.settings)
            rm = self._client.get_registered_model(self.name)
            version = (rm.aliases or {}).get(self.alias)
            route = Route.from_json((rm.tags or {}).get(ROUTE_TAG))
        except Exception as exc:
            self.stats.errors += 1
            log.warning("challenger check failed; keeping what is loaded", extra={
                "worker_id": self.worker_id, "model_name": self.name, "error": str(exc)})
            return
        cur = self._served
        if version is None:
            if cur is not None:
                log.info("challenger alias gone; shadow and canary off", extra={
                    "worker_id": self.worker_id, "model_name": self.name, "model_version": cur.version})
            self._served = None
        elif cur is None or cur.version != str(version):
            try:
                from inference_workers.detector import Detector, make_session

                path = download_version(self.settings, self._client, self.name, str(version))
                thr = self.fixed_thresholds or default_thresholds(
                    self.settings, f"models:/{self.name}/{version}", self.name, str(version), path, self._client)
                session = make_session(path, self.settings.onnx_providers, self.settings.onnx_threads)
                det = Detector(session, thr, name=self.name, version=str(version), path=str(path))
                det.warmup()
                self._served = self.build(det)
                self.stats.loads += 1
                self.stats.versions.append(str(version))
                if self._metrics is not None:
                    self._metrics.info.info({"model_name": self.name, "model_version": str(version)})
                log.info("challenger loaded", extra={"worker_id": self.worker_id, "model_name": self.name,
                                                     "model_version": str(version)})
            except Exception as exc:
                self.stats.errors += 1
                self._served = None
                log.error("challenger cannot be loaded; shadow and canary off", extra={
                    "worker_id": self.worker_id, "model_name": self.name, "model_version": str(version),
                    "error": f"{type(exc).__name__}: {exc}"})
        self._route = route

    # ---- canary routing (infer thread) ----------------------------------------------------------------
    def canary_model(self) -> FrameDetector | None:
        """The challenger when a live canary route names the loaded version, else None."""
        served, route = self._served, self._route
        if served is None or route is None or not route.live() or route.version != served.version:
            return None
        return served

    def route_batch(self, job: Job, model: FrameDetector) -> FrameDetector:
        """StagePipeline.route: the batch's model, split when some of its frames are on canary lines."""
        served, route = self.canary_model(), self._route
        if served is None or route is None:
            return model
        which = [f.ref is not None and route.serves(str(f.ref["line_id"]), str(f.ref["camera_id"])) for f in job.good]
        if not any(which):
            return model
        self.stats.canary_frames += sum(which)
        if self._metrics is not None:
            self._metrics.canary.inc(sum(which))
        return RoutedBatch(model, served, which)

    # ---- shadow (finish thread -> shadow thread) ------------------------------------------------------
    def on_finished(self, job: Job, images: list[np.ndarray], model: FrameDetector) -> None:
        """StagePipeline.on_finished: queue the sampled production-served frames for the shadow run."""
        served = self._served
        if served is None or self.share <= 0 or not images:
            return
        which = getattr(model, "which", None)
        picks = [i for i, f in enumerate(job.good)
                 if f.ref is not None and not (which and which[i]) and bucket(str(f.ref["frame_id"])) < self.share]
        if not picks:
            return
        try:
            self._queue.put_nowait((served, [job.good[i] for i in picks], [images[i] for i in picks], job.start_us))
        except queue.Full:
            self.stats.shadow_dropped += len(picks)
            if self._metrics is not None:
                self._metrics.shadow.labels("dropped").inc(len(picks))

    def _shadow_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            try:
                self._shadow(*item)
            except Exception as exc:  # best effort: log and go on
                self.stats.errors += 1
                log.error("shadow batch failed", extra={"worker_id": self.worker_id, "error": f"{type(exc).__name__}: {exc}"})

    def _shadow(self, served: FrameDetector, frames: list[Frame], images: list[np.ndarray], start_us: int) -> None:
        from schemas.serde import serialize

        out = served.run(images)
        topic = self._topic
        for i, (f, res) in enumerate(zip(frames, out.results, strict=True)):
            if isinstance(res, Exception) or f.ref is None or f.fetched is None:
                continue
            ref, img = f.ref, images[i]
            decision = self.policy.decide(res, served.thresholds, str(ref["camera_id"]))
            now = time.time_ns() // 1000
            timings = Timings(queue_ms=max(0.0, (start_us - int(ref["captured_at"])) / 1000),
                              fetch_ms=f.fetched.fetch_ms, decode_ms=f.fetched.decode_ms, infer_ms=out.infer_ms,
                              postprocess_ms=out.post_ms, total_ms=max(0.0, (now - int(ref["captured_at"])) / 1000),
                              segment_ms=out.segment_ms[i] if out.segment_ms else 0.0)
            rec = inspection_record(ref, res, decision, served, timings=timings, inspected_at_us=now,
                                    batch_size=len(frames), worker_id=self.worker_id,
                                    source_partition=f.msg.partition(), source_offset=f.msg.offset(),
                                    width=img.shape[1], height=img.shape[0])
            value, headers = serialize("inspection", rec)
            while True:
                try:
                    self._producer.produce(topic, value=value, key=str(ref["camera_id"]).encode(), headers=headers)
                    break
                except BufferError:
                    self._producer.poll(0.1)
            self.stats.shadowed += 1
            if self._metrics is not None:
                self._metrics.shadow.labels("produced").inc()
        self._producer.poll(0)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def _watch(self) -> None:
        self.poll()
        while not self._stop.wait(self.poll_s):
            self.poll()

    def start(self) -> Challenger:
        from infra import kafka
        from schemas.catalog import TopicCatalog

        self._topic = TopicCatalog(self.settings.topic_prefix).inspections_shadow
        if self.share > 0:
            self._producer = kafka.producer(self.settings, client_id=f"{self.worker_id}-shadow")
            self._threads.append(threading.Thread(target=self._shadow_loop, name=f"shadow-{self.worker_id}",
                                                  daemon=True))
        self._threads.append(threading.Thread(target=self._watch, name=f"challenger-{self.worker_id}", daemon=True))
        for t in self._threads:
            t.start()
        return self

    def close(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._producer is not None:
            try:  # unblock the shadow thread; what is queued is dropped
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout)
        if self._producer is not None:
            left = self._producer.flush(timeout)
            if left:
                log.warning("shadow inspections not delivered at shutdown", extra={
                    "worker_id": self.worker_id, "in_queue": left})
            self._producer = None


def attach(worker: Any, model_uri: str) -> Challenger | None:
    """Hook a Challenger into the InferenceWorker's pipeline when it serves ``models:/NAME@alias`` (and that alias is
    not the challenger's own); None otherwise."""
    from inference_workers.model_loader import parse_model_uri

    if not model_uri.startswith("models:/"):
        return None
    name, alias, _ = parse_model_uri(model_uri)
    if alias is None or alias == worker.settings.challenger_alias:
        return None
    ch = Challenger(worker.settings, name, worker.models.build, worker_id=worker.worker_id, policy=worker.policy,
                    thresholds=None if worker.watcher.calibrated else worker.watcher.thresholds,
                    registry=worker.metrics.registry)
    worker.pipeline.route = ch.route_batch
    worker.pipeline.on_finished = ch.on_finished
    return ch
