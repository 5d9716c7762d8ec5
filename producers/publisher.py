"""The producer pipeline: capture -> preprocess/encode -> upload + publish, joined by bounded queues.

Each frame is uploaded to the object store and referenced by a FrameRef on the ``frames`` topic
(key camera_id). When the store or the broker is unreachable the publisher turns *degraded*:
frames go to the on-disk spool (producers/spool.py) and a background loop checks health with
backoff, then replays the spool in capture order before live frames flow directly again. Every
frame not delivered is accounted for: dropped by the queue policy, skipped as a duplicate,
spooled, evicted from a full spool, or failed (each counted and logged).
"""

from __future__ import annotations

import collections
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import FrameType
from typing import Any, Generic, Literal, TypeVar

from infra.kafka import (
    AccessDenied,
    BrokerUnavailable,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    check_broker,
)
from infra.kafka import client_log as kafka_client_log
from infra.kafka import producer as make_kafka_producer
from infra.kafka_security import denial, denied_message
from infra.objectstore import ObjectNotFound, ObjectStoreError, open_store
from infra.settings import Settings
from producers.base import Backoff, Counters, Frame, FrameSource, InvalidSourceError, SourceUnavailable
from producers.journal import InFlightJournal, recover
from producers.preprocess import EncodedFrame, Preprocessor
from producers.spool import Spool, SpoolCorrupt, SpoolEntry, SpoolEntryGone, spool_root, warn_legacy
from schemas.catalog import TopicCatalog
from schemas.serde import serialize

log = logging.getLogger(__name__)

DropPolicy = Literal["block", "drop-oldest", "drop-newest"]
DROP_POLICIES: tuple[str, ...] = ("block", "drop-oldest", "drop-newest")

# delivery errors that retrying cannot fix: the frame is counted as failed, never spooled
_PERMANENT = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.INVALID_RECORD,
              KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.TOPIC_AUTHORIZATION_FAILED}

T = TypeVar("T")

REPLAY_FLUSH_S = 10.0  # how long a replayed batch may wait for its acknowledgements
REPLAY_JOIN_S = 15.0  # close() waits this long for the replay thread (> REPLAY_FLUSH_S + a health check)


# ---- stats ------------------------------------------------------------------------------------------


@dataclass
class ProducerStats(Counters):
    """Counters of one run. ``produced`` counts every FrameRef the broker acknowledged (replayed ones too)."""

    captured: int = 0
    produced: int = 0
    skipped_duplicates: int = 0
    dropped: int = 0  # by the capture queue's drop policy
    spooled: int = 0  # written to the spool in this run
    replayed: int = 0  # acknowledged after coming from the spool
    evicted: int = 0  # removed from a full spool, never delivered
    failed: int = 0  # unreadable input, encode errors, permanent delivery errors
    throttled: int = 0  # live frames skipped to honour --fps
    reconnects: int = 0
    spool_pending: int = 0  # frames left in the spool at the end (delivered by a later run)
    recovered: int = 0  # frames a crashed run had in flight, found in its journal and spooled again
    lost_after_crash: int = 0  # ... whose object was gone too: lost, and counted


# ---- bounded queue with a drop policy ------------------------------------------------------------------


class _Closed:
    pass


CLOSED = _Closed()


class FrameQueue(Generic[T]):
    """A bounded FIFO whose full state is a decision: block, drop the oldest, or drop the newest."""

    def __init__(self, maxsize: int, policy: DropPolicy = "block", *, on_drop: Callable[[T], None] | None = None) -> None:
        if maxsize < 1:
            raise InvalidSourceError(f"--queue-size must be >= 1, got {maxsize}")
        if policy not in DROP_POLICIES:
            raise InvalidSourceError(f"--drop-policy must be one of {', '.join(DROP_POLICIES)}, got {policy!r}")
        self.maxsize, self.policy = maxsize, policy
        self.dropped = 0
        self._items: collections.deque[T] = collections.deque()
        self._cond = threading.Condition()
        self._closed = False
        self._on_drop = on_drop

    def __len__(self) -> int:
        with self._cond:
            return len(self._items)

    def put(self, item: T, abort: threading.Event | None = None) -> bool:
        """Enqueue; False when ``item`` itself was dropped (drop-newest, or ``abort`` while blocked)."""
        dropped: T | None = None
        with self._cond:
            if self._closed:  # a straggler after shutdown: counted, never silently lost
                self.dropped += 1
                dropped = item
            elif len(self._items) >= self.maxsize:
                if self.policy == "drop-newest":
                    self.dropped += 1
                    dropped = item
                elif self.policy == "drop-oldest":
                    self.dropped += 1
                    dropped = self._items.popleft()
                else:
                    while len(self._items) >= self.maxsize:
                        if abort is not None and abort.is_set():
                            self.dropped += 1
                            dropped = item
                            break
                        self._cond.wait(0.2)
            if dropped is not item:
                self._items.append(item)
                self._cond.notify_all()
        if dropped is not None and self._on_drop is not None:
            self._on_drop(dropped)
        return dropped is not item

    def get(self, timeout: float) -> T | _Closed | None:
        """The next item; None on timeout; CLOSED once closed and empty."""
        with self._cond:
            end = time.monotonic() + timeout
            while not self._items:
                if self._closed:
                    return CLOSED
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


# ---- upload + publish with spool fallback -----------------------------------------------------------------


def object_key(line_id: str, camera_id: str, captured_at_us: int, frame_id: str) -> str:
    """frames/<line>/<camera>/<YYYY>/<MM>/<DD>/<frame_id>.jpg (UTC date of capture)."""
    d = datetime.fromtimestamp(captured_at_us / 1e6, UTC)
    return f"frames/{line_id}/{camera_id}/{d:%Y}/{d:%m}/{d:%d}/{frame_id}.jpg"


def frame_meta(enc: EncodedFrame) -> dict[str, Any]:
    """The FrameRef fields of an encoded frame, except ``uri`` (known after upload)."""
    f = enc.frame
    return {
        "frame_id": enc.frame_id, "line_id": f.line_id, "camera_id": f.camera_id, "seq": f.seq,
        "captured_at": f.captured_at_us, "width": enc.width, "height": enc.height, "encoding": "jpeg",
        "content_sha256": enc.sha256, "part_id": f.part_id, "trigger_id": f.trigger_id,
        "size_bytes": len(enc.data),
        "truth": None if enc.truth is None else [
            {"class_name": c, "x1": float(x1), "y1": float(y1), "x2": float(x2), "y2": float(y2)}
            for c, x1, y1, x2, y2 in enc.truth],
    }


class Publisher:
    """Uploads frames and produces FrameRefs; spools on failure; replays the spool when healthy."""

    def __init__(self, settings: Settings, stats: ProducerStats, *, cameras: Sequence[str] | None = None,
                 client_id: str | None = None,
                 spool_max_bytes: int = 1 << 30, max_in_flight: int = 1000,
                 health_backoff: Backoff | None = None, replay_batch: int = 100) -> None:
        self.settings, self.stats = settings, stats
        self.client_id = client_id or f"sqis-producer-{socket.gethostname()}-{os.getpid()}"
        self.topic = TopicCatalog(settings.topic_prefix).frames
        self.max_in_flight, self.replay_batch = max_in_flight, replay_batch
        self._backoff = health_backoff or Backoff(0.5, 2.0, 5.0, None)
        self._mode_lock = threading.Lock()  # orders "spool or publish" against "spool empty -> online"
        self._producer_lock = threading.RLock()
        self._pending: dict[str, tuple[dict[str, Any], bytes]] = {}
        self._pending_lock = threading.Lock()
        self._needs_reset = False
        self._stop_replay = threading.Event()
        self._abort = threading.Event()  # replaced by close()'s abort: stop waiting for the broker at once
        self.degraded = False
        self.denied: str | None = None  # the broker refused this principal the frames topic (no ACL)
        self.spool = Spool(spool_root(settings), spool_max_bytes, cameras=cameras)
        self.legacy_frames = 0  # in the pre-deployment spool layout: never replayed here (see _setup)
        self.journal = InFlightJournal(self.spool.root / ".journal", self.client_id)
        try:
            self._setup(settings)
        except BaseException:
            self.spool.close()
            raise
        self._replayer = threading.Thread(target=self._replay_loop, name="producer-replay", daemon=True)
        self._replayer.start()

    def _setup(self, settings: Settings) -> None:
        self.legacy_frames = sum(r.frames for r in warn_legacy(self.spool.root.parent))
        self.store = open_store(settings)
        if hasattr(self.store, "ensure_bucket"):
            try:
                self.store.ensure_bucket()
            except Exception as exc:  # unreachable: the health check below turns us degraded
                log.warning("cannot ensure the bucket", extra={"error": str(exc)})
        self._producer = self._make_producer()
        self._recover_journal()
        if len(self.spool) > 0:
            self._go_degraded("spool holds frames from an earlier run", reset=False)
        elif not self.healthy():
            self._go_degraded("object store or broker unreachable at start", reset=False)

    def _recover_journal(self) -> None:
        """Frames a crashed producer of this deployment had in flight: back into the spool, counted."""
        refs, files = recover(self.journal.dir)
        if not files:
            return
        keep = False
        for ref in refs:
            meta = {k: v for k, v in ref.items() if k != "uri"}
            try:
                data = self.store.get(ref["uri"])
            except ObjectNotFound:
                self.stats.add("lost_after_crash")
                log.error("frame in flight at a crash is lost (its object is gone)",
                          extra={"frame_id": ref["frame_id"], "uri": ref["uri"]})
                continue
            except (ObjectStoreError, OSError) as exc:
                keep = True  # try again at the next start
                log.warning("cannot recover a frame of a crashed run yet", extra={"frame_id": ref["frame_id"],
                                                                                  "error": str(exc)})
                continue
            entry, evicted = self.spool.put(meta, data)
            if entry is not None:
                self.stats.add("recovered")
            if evicted:
                self.stats.add("evicted", evicted)
        if not keep:
            for f in files:
                f.unlink(missing_ok=True)
        log.warning("a previous producer of this deployment crashed: %d frames it had in flight were "
                    "recovered into the spool, %d lost", self.stats.recovered, self.stats.lost_after_crash,
                    extra={"journals": len(files)})

    # -- kafka plumbing
    def _make_producer(self) -> Producer:
        return make_kafka_producer(self.settings, client_id=self.client_id, error_cb=self._on_kafka_error,
                                   logger=kafka_client_log)  # de-duplicated: one line a minute per message

    def _on_kafka_error(self, err: KafkaError) -> None:
        if denial(err) and self.denied is None:  # e.g. no WRITE on any topic: no idempotent producer id
            self.denied = denied_message(self.settings, err, self.topic)
            log.error(self.denied)
        if err.fatal() or err.code() == KafkaError._ALL_BROKERS_DOWN:
            self._go_degraded(f"kafka: {err.str()}")
        else:
            log.debug("kafka client error", extra={"error": err.str()})

    def _go_degraded(self, reason: str, *, reset: bool = True) -> None:
        with self._mode_lock:
            if reset:
                self._needs_reset = True
            if not self.degraded:
                self.degraded = True
                log.warning("publisher degraded: frames go to the spool", extra={"reason": reason})

    def healthy(self) -> bool:
        """Both the object store and the broker (with the frames topic) answer."""
        try:
            self.store.put(f"_health/{self.client_id}", b"ok", "text/plain")
        except (ObjectStoreError, OSError) as exc:
            log.info("object store unhealthy", extra={"error": str(exc)})
            return False
        try:
            with self._producer_lock:
                producer = self._producer
            md = producer.list_topics(timeout=2.0)
        except KafkaException as exc:
            log.info("broker unhealthy", extra={"error": str(exc)})
            return False
        t = md.topics.get(self.topic)
        if t is None or t.error is not None:
            log.info("frames topic missing", extra={"topic": self.topic})
            return False
        return True

    # -- the publish path (one thread)
    def publish(self, enc: EncodedFrame) -> None:
        """Upload + produce ``enc``, or spool it when degraded or on failure."""
        meta = frame_meta(enc)
        with self._mode_lock:
            if self.degraded:
                self._spool(meta, enc.data)
                return
        key = object_key(enc.frame.line_id, enc.frame.camera_id, enc.frame.captured_at_us, enc.frame_id)
        try:
            uri = self.store.put(key, enc.data, "image/jpeg")
        except (ObjectStoreError, OSError) as exc:
            self._go_degraded(f"object store: {exc}", reset=False)
            self._spool(meta, enc.data)
            return
        self._produce(meta, uri, enc.data, replay=False)
        while self.in_flight() > self.max_in_flight and not self.degraded:
            with self._producer_lock:
                self._producer.poll(0.1)

    def in_flight(self) -> int:
        with self._pending_lock:
            return len(self._pending)

    def _produce(self, meta: dict[str, Any], uri: str, data: bytes, *, replay: bool,
                 on_done: Callable[[bool], None] | None = None) -> bool:
        rec = meta | {"uri": uri}
        payload, headers = serialize("frame_ref", rec)
        fid = rec["frame_id"]
        if not replay:
            self.journal.record(rec)  # before it exists only in librdkafka's memory
            with self._pending_lock:
                self._pending[fid] = (meta, data)
        cb = self._on_delivery_factory(fid, replay, on_done)
        with self._producer_lock:
            try:
                self._producer.produce(self.topic, key=rec["camera_id"].encode(), value=payload,
                                       headers=headers, on_delivery=cb)
            except (BufferError, KafkaException) as exc:
                log.warning("produce failed", extra={"frame_id": fid, "error": str(exc)})
                self._go_degraded(f"produce: {exc}")
                if not replay:
                    with self._pending_lock:
                        self._pending.pop(fid, None)
                    self._spool(meta, data)
                    self.journal.done(fid)
                return False
            self._producer.poll(0)
        return True

    def _on_delivery_factory(self, fid: str, replay: bool,
                             on_done: Callable[[bool], None] | None) -> Callable[[KafkaError | None, Message], None]:
        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            entry = None
            if not replay:
                with self._pending_lock:
                    entry = self._pending.pop(fid, None)
            if err is None:
                self.stats.add("produced")
                if replay:
                    self.stats.add("replayed")
                ok = True
            elif denial(err):  # no ACL: every frame would fail alike; one line, and run_pipeline stops
                self.stats.add("failed")
                if self.denied is None:
                    self.denied = denied_message(self.settings, err, self.topic)
                    log.error(self.denied, extra={"frame_id": fid})
                ok = True
            elif err.code() in _PERMANENT:
                self.stats.add("failed")
                log.error("frame cannot be published (permanent error)", extra={"frame_id": fid, "error": err.str()})
                ok = True  # nothing to retry: do not keep it in the spool
            else:
                ok = False
                purged = err.code() in (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)
                log.log(logging.DEBUG if purged else logging.WARNING, "delivery failed",
                        extra={"frame_id": fid, "error": err.str()})
                self._go_degraded(f"delivery: {err.str()}", reset=not purged)
                if entry is not None:
                    self._spool(*entry)
            if not replay:
                self.journal.done(fid)
            if on_done is not None:
                on_done(ok)

        return on_delivery

    def _spool(self, meta: dict[str, Any], data: bytes) -> None:
        try:
            entry, evicted = self.spool.put(meta, data)
        except OSError as exc:
            self.stats.add("failed")
            log.error("cannot spool frame: lost", extra={"frame_id": meta["frame_id"], "error": str(exc)})
            return
        if entry is not None:
            self.stats.add("spooled")
        if evicted:
            self.stats.add("evicted", evicted)

    def poll(self, timeout: float = 0.0) -> None:
        with self._producer_lock:
            self._producer.poll(timeout)

    # -- recovery (background thread)
    def _reset_producer(self) -> None:
        """Purge the old producer (its undelivered frames are spooled by their callbacks) and make a new one."""
        spooled_before = self.stats.spooled
        with self._producer_lock:
            old = self._producer
            self._needs_reset = False
            try:
                old.purge(in_queue=True, in_flight=True)
                old.flush(2.0)
            except KafkaException as exc:
                log.warning("purging the old producer failed", extra={"error": str(exc)})
            self._producer = self._make_producer()
        with self._pending_lock:  # frames whose callbacks never came: spool them
            leftovers = list(self._pending.values())
            self._pending.clear()
        for meta, data in leftovers:
            self._spool(meta, data)
            self.journal.done(meta["frame_id"])
        if self.stats.spooled > spooled_before:
            log.warning("in-flight frames moved to the spool",
                        extra={"frames": self.stats.spooled - spooled_before})

    def _replay_loop(self) -> None:
        """Runs until close(); an error (no Kafka configured while the stack restarts, a broken
        client) is logged once per minute and retried with backoff, never ends the thread."""
        last_logged = 0.0
        while not self._stop_replay.is_set() and not self._abort.is_set():
            try:
                self._replay_turn()
            except Exception as exc:
                self._needs_reset = True
                if time.monotonic() - last_logged > 60:
                    log.warning("replay loop: %s; retrying with backoff", exc, extra={"error": str(exc)})
                    last_logged = time.monotonic()
                self._stop_replay.wait(self._backoff.next_delay() or self._backoff.cap_s)

    def _replay_turn(self) -> None:
        if not self.degraded:
            self._stop_replay.wait(0.2)
            return
        if self._needs_reset:
            self._reset_producer()
        if not self.healthy():
            # a fresh client re-resolves the bootstrap (a restarted local stack has a new port)
            self._needs_reset = True
            delay = self._backoff.next_delay() or self._backoff.cap_s
            self._stop_replay.wait(delay)
            return
        if self._needs_reset:
            self._reset_producer()
        if self._replay_some():
            with self._mode_lock:
                if len(self.spool) == 0 and not self._needs_reset:
                    self.degraded = False
                    self._backoff.reset()
                    log.info("publisher recovered: spool replayed, publishing directly")
        else:
            self._stop_replay.wait(self._backoff.next_delay() or self._backoff.cap_s)

    def _replay_some(self) -> bool:
        """Replay the oldest spooled frames; True when that batch was fully delivered."""
        batch = self.spool.oldest(self.replay_batch)
        if not batch:
            return True
        results: dict[SpoolEntry, bool] = {}
        sent: list[SpoolEntry] = []
        complete = True
        for entry in batch:
            if self._stop_replay.is_set() or self._abort.is_set():
                complete = False
                break
            try:
                meta, data = self.spool.read(entry)
            except SpoolEntryGone:
                # evicted by a full spool since oldest(): already counted as evicted
                log.debug("spooled frame evicted before replay", extra={"file": entry.name})
                self.spool.remove(entry)
                continue
            except SpoolCorrupt as exc:
                self.stats.add("failed")
                log.error("corrupt spool file removed", extra={"file": entry.name, "error": str(exc)})
                self.spool.remove(entry)
                continue
            key = object_key(meta["line_id"], meta["camera_id"], meta["captured_at"], meta["frame_id"])
            try:
                uri = self.store.put(key, data, "image/jpeg")
            except (ObjectStoreError, OSError) as exc:
                log.warning("replay upload failed", extra={"frame_id": meta["frame_id"], "error": str(exc)})
                complete = False
                break

            def done(ok: bool, e: SpoolEntry = entry) -> None:
                results[e] = ok

            if not self._produce(meta, uri, data, replay=True, on_done=done):
                complete = False
                break
            sent.append(entry)
        with self._producer_lock:
            producer = self._producer
        # outside the lock (the publish thread keeps spooling meanwhile), in short steps so an abort
        # stops the wait: what is not acknowledged stays spooled for the next run
        deadline = time.monotonic() + REPLAY_FLUSH_S
        left = producer.flush(0.2)
        while left and time.monotonic() < deadline and not self._abort.is_set():
            left = producer.flush(0.2)
        for entry in sent:
            if results.get(entry):
                self.spool.remove(entry)
        ok = complete and left == 0 and len(results) == len(sent) and all(results.values())
        if ok:
            log.info("spool batch replayed", extra={"frames": len(batch), "left": len(self.spool)})
        return ok

    # -- shutdown
    def close(self, drain_timeout_s: float, abort: threading.Event | None = None) -> None:
        """Flush what is in flight, give the replay loop until the deadline, spool the rest.

        ``abort`` (a second signal) also stops the replay thread and skips the final flush: what is
        in flight goes to the spool at once.
        """
        if abort is not None:
            self._abort = abort  # seen by the replay thread from its next check on
        deadline = time.monotonic() + drain_timeout_s
        while self.in_flight() > 0 and time.monotonic() < deadline and not self._abort.is_set():
            self.poll(0.2)
        if self.in_flight() > 0:
            log.warning("frames still in flight at shutdown: spooling them", extra={"frames": self.in_flight()})
            self._go_degraded("shutdown with frames in flight")
            self._reset_producer()
        while (self.degraded or len(self.spool) > 0) and time.monotonic() < deadline \
                and not self._abort.is_set():
            time.sleep(0.1)
        self._stop_replay.set()
        self._replayer.join(1.0 if self._abort.is_set() else REPLAY_JOIN_S)
        if self._replayer.is_alive():
            log.warning("replay thread did not stop in time; its unacknowledged frames stay spooled")
        with self._producer_lock:
            if self._abort.is_set() or self.denied or self._producer.flush(2.0) > 0:
                self._reset_producer()
        self.stats.spool_pending = len(self.spool)
        self.journal.close()
        self.spool.close()
        if self.stats.spool_pending:
            log.warning("frames left in the spool; the next run replays them",
                        extra={"frames": self.stats.spool_pending, "spool": str(self.spool.root)})


# ---- the pipeline --------------------------------------------------------------------------------------


def _capture(source: FrameSource, out: FrameQueue[Frame], stop: threading.Event, abort: threading.Event,
             fps: float, stats: ProducerStats) -> None:
    """One camera's thread: read frames at ``fps`` (0: as fast as possible) into the capture queue."""
    interval = 1.0 / fps if fps > 0 else 0.0
    live = bool(getattr(source, "live", False))
    next_t = time.monotonic()
    it = source.frames(stop)
    reconnects_before = source.reconnects
    try:
        while not stop.is_set():
            if interval and not live:
                stop.wait(max(0.0, next_t - time.monotonic()))
                if stop.is_set():
                    break
            try:
                frame = next(it)
            except StopIteration:
                break
            if interval:
                now = time.monotonic()
                if live and now < next_t:
                    stats.add("throttled")
                    continue
                next_t = max(next_t + interval, now - interval)
            stats.add("captured")
            out.put(frame, abort)
    except SourceUnavailable as exc:
        stats.add("failed")
        log.error("camera gave up", extra={"camera_id": source.camera_id, "error": str(exc)})
    except Exception:
        stats.add("failed")
        log.exception("camera thread crashed", extra={"camera_id": source.camera_id})
    finally:
        stats.add("reconnects", source.reconnects - reconnects_before)
        stats.add("failed", source.failed_reads)
        source.close()


def _preprocess(inq: FrameQueue[Frame], outq: FrameQueue[EncodedFrame], pre: Preprocessor,
                stats: ProducerStats) -> None:
    while True:
        item = inq.get(0.5)
        if item is CLOSED:
            break
        if item is None or isinstance(item, _Closed):
            continue
        try:
            enc = pre.process(item, str(uuid.uuid4()))
        except Exception:
            stats.add("failed")
            log.exception("preprocessing failed", extra={"camera_id": item.camera_id, "seq": item.seq})
            continue
        if enc is None:
            stats.add("skipped_duplicates")
        else:
            outq.put(enc)  # blocks: back-pressure reaches the capture queue and its drop policy
    outq.close()


def _publish(inq: FrameQueue[EncodedFrame], pub: Publisher, stats: ProducerStats) -> None:
    while True:
        item = inq.get(0.2)
        if item is CLOSED:
            break
        if item is None or isinstance(item, _Closed):
            pub.poll(0)
            continue
        try:
            pub.publish(item)
        except Exception:
            stats.add("failed")
            log.exception("publishing failed", extra={"frame_id": item.frame_id})


def run_pipeline(settings: Settings, sources: Sequence[FrameSource], pre: Preprocessor, *,
                 fps: float = 0.0, queue_size: int = 64, drop_policy: DropPolicy = "block",
                 spool_max_bytes: int = 1 << 30, drain_timeout_s: float = 10.0,
                 stop_event: threading.Event | None = None,
                 progress: Callable[[dict[str, int]], None] | None = None,
                 progress_interval_s: float = 0.5, install_signal_handlers: bool = True,
                 capture_grace_s: float = 5.0) -> ProducerStats:
    """Run sources -> preprocess -> publish until the sources end or ``stop_event`` is set.

    SIGTERM/SIGINT (main thread only) set the stop event: capture stops, queued frames are
    drained, in-flight FrameRefs flushed and what cannot be sent is spooled. A second signal
    skips waiting for the broker (everything left goes to the spool).
    """
    stop = stop_event or threading.Event()
    abort = threading.Event()
    stats = ProducerStats()
    try:  # refused credentials end the run at once; an unreachable broker is an outage (the spool)
        check_broker(settings, timeout_s=2.0, topics=[TopicCatalog(settings.topic_prefix).frames])
    except AccessDenied:
        raise
    except BrokerUnavailable as exc:  # said at once; the frames wait in the spool until it answers
        log.warning("%s; frames are spooled until it answers", exc)
    def on_drop(frame: Frame) -> None:
        stats.add("dropped")
        n = stats.dropped
        if n == 1 or n % 100 == 0:
            log.warning("capture queue full: frames dropped", extra={
                "policy": drop_policy, "dropped_total": n, "camera_id": frame.camera_id, "seq": frame.seq})

    capq: FrameQueue[Frame] = FrameQueue(queue_size, drop_policy, on_drop=on_drop)
    encq: FrameQueue[EncodedFrame] = FrameQueue(max(2, queue_size // 4), "block")
    publisher = Publisher(settings, stats, cameras=[s.camera_id for s in sources], spool_max_bytes=spool_max_bytes)

    previous: dict[int, Any] = {}
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        def on_signal(signum: int, _frame: FrameType | None) -> None:
            if stop.is_set():
                abort.set()
            stop.set()
            log.info("signal received: stopping", extra={"signal": signal.Signals(signum).name})

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, on_signal)

    captures = [threading.Thread(target=_capture, args=(s, capq, stop, abort, fps, stats),
                                 name=f"capture-{s.camera_id}", daemon=True) for s in sources]
    pre_t = threading.Thread(target=_preprocess, args=(capq, encq, pre, stats), name="preprocess", daemon=True)
    pub_t = threading.Thread(target=_publish, args=(encq, publisher, stats), name="publish", daemon=True)
    log.info("producer started", extra={"cameras": len(sources), "topic": publisher.topic,
                                        "store": publisher.store.url, "degraded": publisher.degraded})
    try:
        for t in (*captures, pre_t, pub_t):
            t.start()

        def report() -> None:
            if progress is not None:
                progress(stats.snapshot() | {"spool": len(publisher.spool), "degraded": int(publisher.degraded)})

        stopped_at: float | None = None
        for t in captures:
            while t.is_alive():
                t.join(progress_interval_s)
                report()
                if publisher.denied:
                    stop.set()
                if stop.is_set():
                    stopped_at = stopped_at or time.monotonic()
                    if time.monotonic() - stopped_at > capture_grace_s:
                        log.warning("a camera did not stop in time; moving on", extra={"thread": t.name})
                        break
        capq.close()
        while pub_t.is_alive():
            pub_t.join(progress_interval_s)
            report()
        pre_t.join()
        publisher.close(drain_timeout_s, abort)
        report()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        publisher.spool.close()  # idempotent; releases the camera locks even after a crash
    log.info("producer finished", extra=stats.snapshot())
    if publisher.denied:
        raise AccessDenied(publisher.denied)
    return stats
