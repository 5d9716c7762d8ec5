"""The worker loop against an in-memory consumer/producer: model failures, store outages, rebalances, swaps.

Deterministic and broker-free: the fake consumer hands out messages from a per-partition log and
implements pause/resume/seek/commit the way librdkafka does (the pause flag survives a reassignment).
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from infra import kafka as kafka_mod
from infra.kafka import TopicPartition
from infra.objectstore import FileStore, ObjectStoreError
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.serde import deserialize, serialize

PartKey = tuple[str, int]
MAX_CALLS = 5000  # a loop that never settles is a bug: the fake consumer stops it and the test fails


class FakeMsg:
    def __init__(self, topic: str, partition: int, offset: int, key: bytes | None, value: bytes,
                 headers: list[tuple[str, bytes]] | None) -> None:
        self._t, self._p, self._o, self._k, self._v, self._h = topic, partition, offset, key, value, headers

    def topic(self) -> str:
        return self._t

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o

    def key(self) -> bytes | None:
        return self._k

    def value(self) -> bytes:
        return self._v

    def headers(self) -> list[tuple[str, bytes]] | None:
        return self._h

    def error(self) -> None:
        return None


class FakeConsumer:
    """Serves ``logs`` to the worker; ``hook(self)`` runs on every poll/consume (to stop or rebalance)."""

    def __init__(self, logs: dict[PartKey, list[FakeMsg]], hook: Callable[[FakeConsumer], None]) -> None:
        self.logs, self.hook = logs, hook
        self.pos: dict[PartKey, int] = {}
        self.paused: set[PartKey] = set()  # like librdkafka: kept across revoke/assign
        self.committed: dict[PartKey, int] = {}
        self.stored: dict[PartKey, int] = {}
        self.assigned: set[PartKey] = set()
        self.seeks: list[tuple[PartKey, int]] = []
        self.calls = self.idle = 0
        self.per_call: int | None = None  # at most this many messages per poll/consume
        self.stop: Any = None
        self.callbacks: dict[str, Any] = {}

    def subscribe(self, topics: list[str], on_assign: Any, on_revoke: Any, on_lost: Any) -> None:
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}
        self.assign(sorted(self.logs))

    def assign(self, keys: list[PartKey]) -> None:
        for k in keys:
            self.pos[k] = self.committed.get(k, 0)
        self.assigned |= set(keys)
        self.callbacks["assign"](self, [TopicPartition(t, p) for t, p in keys])

    def revoke(self, keys: list[PartKey]) -> None:
        self.callbacks["revoke"](self, [TopicPartition(t, p) for t, p in keys])
        self.assigned -= set(keys)

    def _take(self, n: int) -> list[FakeMsg]:
        self.calls += 1
        if self.calls > MAX_CALLS:
            self.stop.set()
            return []
        self.hook(self)
        n = min(n, self.per_call or n)
        out: list[FakeMsg] = []
        for k in sorted(self.assigned - self.paused):
            log = self.logs[k]
            while len(out) < n and self.pos[k] < len(log):
                out.append(log[self.pos[k]])
                self.pos[k] += 1
        self.idle = 0 if out else self.idle + 1
        return out

    def poll(self, timeout: float) -> FakeMsg | None:
        got = self._take(1)
        return got[0] if got else None

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMsg]:
        return self._take(num_messages)

    def pause(self, tps: list[TopicPartition]) -> None:
        self.paused |= {(tp.topic, tp.partition) for tp in tps}

    def resume(self, tps: list[TopicPartition]) -> None:
        self.paused -= {(tp.topic, tp.partition) for tp in tps}

    def seek(self, tp: TopicPartition) -> None:
        self.pos[(tp.topic, tp.partition)] = tp.offset
        self.seeks.append(((tp.topic, tp.partition), tp.offset))
        self.idle = 0  # there is something to hand out again

    def consumer_group_metadata(self) -> None:
        return None

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        self.stored.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> None:
        if offsets is None:
            self.committed.update(self.stored)
        else:
            self.committed.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def close(self) -> None:
        pass


class FakeProducer:
    """Delivers on poll/flush; keeps what was produced per topic. Transactions (exactly_once): offsets
    sent in a transaction reach ``consumer.committed`` when it commits."""

    def __init__(self, consumer: FakeConsumer) -> None:
        self.records: dict[str, list[tuple[bytes | None, bytes, dict[str, bytes]]]] = {}
        self._pending: list[Any] = []
        self.consumer = consumer
        self._txn_offsets: dict[PartKey, int] = {}
        self.transactions = 0

    def __len__(self) -> int:
        return len(self._pending)

    def init_transactions(self, timeout: float = -1) -> None:
        pass

    def begin_transaction(self) -> None:
        self._txn_offsets = {}

    def send_offsets_to_transaction(self, offsets: list[TopicPartition], meta: Any, timeout: float = -1) -> None:
        self._txn_offsets.update({(tp.topic, tp.partition): tp.offset for tp in offsets})

    def commit_transaction(self, timeout: float = -1) -> None:
        self.flush()
        self.consumer.committed.update(self._txn_offsets)
        self.transactions += 1

    def abort_transaction(self, timeout: float = -1) -> None:
        self._pending, self._txn_offsets = [], {}

    def produce(self, topic: str, value: bytes, key: bytes | None = None, headers: Any = None,
                on_delivery: Any = None) -> None:
        self.records.setdefault(topic, []).append((key, value, dict(headers or [])))
        self._pending.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        done, self._pending = self._pending, []
        for cb in done:
            cb(None, None)
        return len(done)

    def flush(self, timeout: float = 0) -> int:
        self.poll()
        return 0

    def close(self) -> None:
        pass


class FakeDetector:
    """Returns no detections; raises for the images ``fails(image)`` picks (any of them fails a batch)."""

    name = "fake"

    def __init__(self, version: str, fails: Callable[[np.ndarray], bool] = lambda im: False) -> None:
        self.version, self.fails, self.calls = version, fails, 0

    def detect(self, images: list[np.ndarray]) -> list[list[Any]]:
        self.calls += 1
        if any(self.fails(im) for im in images):
            raise RuntimeError(f"CUDA out of memory (batch of {len(images)})")
        return [[] for _ in images]


class FakeWatcher:
    def __init__(self, *a: Any, **k: Any) -> None:
        self.current: FakeDetector = FakeDetector("1")
        self.promoted: FakeDetector | None = None
        self.swapped_with_pending: list[int] = []
        self.batcher_len: Callable[[], int] = lambda: 0

    def maybe_reload(self, force: bool = False) -> bool:
        if self.promoted is None or self.current is self.promoted:
            return False
        self.swapped_with_pending.append(self.batcher_len())
        self.current = self.promoted
        return True


class Harness:
    """One worker on a 1..n-partition frames topic, fed from a real file:// store."""

    def __init__(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, partitions: int = 1) -> None:
        from inference_workers import model_loader

        monkeypatch.setattr(model_loader, "ModelWatcher", FakeWatcher)
        self.settings = Settings(state_dir=tmp_path / "state", topic_prefix=f"t{uuid.uuid4().hex[:6]}.")
        self.catalog = TopicCatalog(self.settings.topic_prefix)
        self.store = FileStore((tmp_path / "objects").as_uri())
        self.logs: dict[PartKey, list[FakeMsg]] = {(self.catalog.frames, p): [] for p in range(partitions)}
        self.hook: Callable[[FakeConsumer], None] = lambda c: None
        self.consumer = FakeConsumer(self.logs, lambda c: self.hook(c))
        self.producer = FakeProducer(self.consumer)
        monkeypatch.setattr(kafka_mod, "consumer", lambda *a, **k: self.consumer)
        monkeypatch.setattr(kafka_mod, "producer", lambda *a, **k: self.producer)

    def add_frame(self, partition: int = 0, height: int = 64, uri: str | None = None) -> dict[str, Any]:
        img = np.full((height, 64, 3), 100, np.uint8)
        data = cv2.imencode(".jpg", img)[1].tobytes()
        frame_id = str(uuid.uuid4())
        ref = {"frame_id": frame_id, "line_id": "l1", "camera_id": "c1", "seq": 0, "captured_at": 1_700_000_000_000_000,
               "uri": uri or self.store.put(f"f/{frame_id}.jpg", data), "width": 64, "height": height,
               "encoding": "jpeg", "content_sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
               "part_id": None, "trigger_id": None, "truth": None}
        value, headers = serialize("frame_ref", ref)
        k = (self.catalog.frames, partition)
        self.logs[k].append(FakeMsg(k[0], k[1], len(self.logs[k]), b"c1", value, headers))
        return ref

    def worker(self, **kw: Any) -> Any:
        from inference_workers.worker import InferenceWorker

        kw.setdefault("max_wait_ms", 0)
        kw.setdefault("rewind_backoff_s", (0.0, 0.0))
        w = InferenceWorker(self.settings, "fake.onnx", store=self.store, fetch_threads=1, **kw)
        w.fetcher._sleep = lambda s: None
        w.watcher.batcher_len = lambda: len(w.batcher)
        self.consumer.stop = w._stop
        return w

    def run_until_idle(self, w: Any, extra: Callable[[FakeConsumer], None] = lambda c: None,
                       batch_done: bool = True) -> Any:
        """Run the worker until the consumer had nothing to hand out several times in a row."""
        def hook(c: FakeConsumer) -> None:
            extra(c)
            if c.idle >= 5 and (len(w.batcher) == 0 or not batch_done) and w.batches_in_flight == 0:
                w.stop()

        self.hook = hook
        return w.run()

    def inspections(self) -> list[dict[str, Any]]:
        return [deserialize("inspection", v, list(h.items()))
                for _, v, h in self.producer.records.get(self.catalog.inspections, [])]

    def dead_letters(self) -> list[tuple[str, str]]:
        """(error type, source) of each DLQ record."""
        return [(h["sqis-error-type"].decode(), h["sqis-source"].decode())
                for _, _, h in self.producer.records.get(self.catalog.frames_dlq, [])]


@pytest.fixture
def harness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Harness:
    return Harness(tmp_path, monkeypatch)


def test_model_failing_on_every_frame_rewinds_then_stops_without_committing(harness: Harness) -> None:
    from inference_workers.worker import WorkerError

    h = harness
    h.add_frame(uri=h.store.url + "/gone.jpg")  # offset 0: bad input, dead-lettered and committed
    for _ in range(5):
        h.add_frame()
    w = h.worker(max_batch=2, max_inference_failures=3)
    w.watcher.current = FakeDetector("1", fails=lambda im: True)  # e.g. a promoted model failing at batch 8
    with pytest.raises(WorkerError, match="failed on every frame of 3 batches in a row"):
        h.run_until_idle(w)
    k = (h.catalog.frames, 0)
    assert h.consumer.calls < MAX_CALLS
    assert h.inspections() == []
    assert h.dead_letters() == [("missing_object", f"{k[0]}[0]@0")]  # no inference_error: not the frames' fault
    assert h.consumer.seeks == [(k, 1)] * 3 and w.stats.rewinds == 3
    assert h.consumer.committed.get(k) == 1  # nothing past the frames the model could not run on


def test_model_recovering_after_failed_batches_inspects_everything(harness: Harness) -> None:
    h = harness
    refs = [h.add_frame() for _ in range(6)]
    w = h.worker(max_batch=3, max_inference_failures=3)
    det = FakeDetector("1", fails=lambda im: w.stats.rewinds < 2)  # a transient runtime failure (twice)
    w.watcher.current = det
    stats = h.run_until_idle(w)
    assert h.consumer.calls < MAX_CALLS
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for r in refs)
    assert h.dead_letters() == [] and stats.dead_lettered == 0 and stats.rewinds == 2
    assert h.consumer.committed == {(h.catalog.frames, 0): 6}


def test_frame_the_model_fails_on_alone_is_dead_lettered_when_others_succeed(harness: Harness) -> None:
    h = harness
    refs = [h.add_frame(height=48 if i == 2 else 64) for i in range(4)]
    w = h.worker(max_batch=4)
    w.watcher.current = FakeDetector("1", fails=lambda im: im.shape[0] == 48)
    stats = h.run_until_idle(w)
    k = h.catalog.frames
    assert h.dead_letters() == [("inference_error", f"{k}[0]@2")]
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for j, r in enumerate(refs) if j != 2)
    assert stats.rewinds == 0 and h.consumer.committed == {(k, 0): 4}


class OutageStore:
    """The real store, but reads of ``bad`` fail as a transient outage until healed."""

    def __init__(self, inner: FileStore, bad: str) -> None:
        self.inner, self.bad, self.healed, self.url = inner, bad, False, inner.url

    def get(self, uri: str) -> bytes:
        if uri == self.bad and not self.healed:
            raise ObjectStoreError("simulated outage")
        return self.inner.get(uri)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_store_outage_is_waited_out_never_dead_lettered(harness: Harness) -> None:
    """#8 item 3: however long the store is down, a good frame is not dead-lettered as store_unavailable;
    the partition stays paused with backoff and a gauge says so (on main it went to the DLQ after 20 rewinds)."""
    h = harness
    refs = [h.add_frame() for _ in range(5)]
    store = h.store = OutageStore(h.store, refs[2]["uri"])  # type: ignore[assignment]
    w = h.worker(max_batch=2)
    w.fetcher.retries = 0
    gauge: list[float] = []

    def heal_after_25(c: FakeConsumer) -> None:
        gauge.append(w.metrics.registry.get_sample_value("sqis_worker_store_unavailable") or 0.0)
        if len(c.seeks) >= 25:
            store.healed = True

    stats = h.run_until_idle(w, heal_after_25)
    k = h.catalog.frames
    assert h.consumer.calls < MAX_CALLS
    assert h.consumer.seeks == [((k, 0), 2)] * 25 and stats.rewinds == 25
    assert h.dead_letters() == [] and stats.dead_lettered == 0
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for r in refs)
    assert h.consumer.committed == {(k, 0): 5}
    assert max(gauge) == 1.0 and gauge[-1] == 0.0  # raised during the outage, cleared after


def test_lone_frame_the_model_fails_on_is_retried_then_dead_lettered(harness: Harness) -> None:
    """#8 item 2: a 1-frame batch the model fails on (while it runs on other images) is retried a
    bounded number of times, then dead-lettered as inference_error; the partition keeps moving."""
    h = harness
    refs = [h.add_frame(height=48 if i == 1 else 64) for i in range(3)]
    h.consumer.per_call = 1
    w = h.worker(max_batch=1, max_frame_retries=2, max_inference_failures=2)
    w.watcher.current = FakeDetector("1", fails=lambda im: im.shape[0] == 48)
    stats = h.run_until_idle(w)
    k = h.catalog.frames
    assert h.consumer.calls < MAX_CALLS
    assert h.consumer.seeks == [((k, 0), 1)] * 2
    assert [(t, s) for t, s in h.dead_letters()] == [("inference_error", f"{k}[0]@1")]
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for j, r in enumerate(refs) if j != 1)
    assert stats.dead_lettered == 1 and h.consumer.committed == {(k, 0): 3}


def test_paused_partition_is_resumed_when_revoked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness(tmp_path, monkeypatch, partitions=2)
    refs = [h.add_frame(partition=p) for p in (0, 1) for _ in range(3)]
    store = h.store = OutageStore(h.store, refs[1]["uri"])  # type: ignore[assignment]
    w = h.worker(max_batch=8, rewind_backoff_s=(3600.0, 3600.0))  # paused for an hour unless resumed
    w.fetcher.retries = 0
    k0 = (h.catalog.frames, 0)
    rebalanced: list[bool] = []

    def rebalance(c: FakeConsumer) -> None:
        if k0 in c.paused and not rebalanced:  # the group rebalances while partition 0 is paused
            rebalanced.append(True)
            store.healed = True
            c.revoke([k0])
            c.assign([k0])  # ... and gives it back to this worker

    stats = h.run_until_idle(w, rebalance)
    assert rebalanced and h.consumer.paused == set()
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for r in refs)
    assert stats.dead_lettered == 0 and h.consumer.committed == {k0: 3, (h.catalog.frames, 1): 3}


def test_promoted_model_goes_live_while_a_batch_is_open(harness: Harness) -> None:
    h = harness
    refs = [h.add_frame() for _ in range(10)]
    h.consumer.per_call = 1  # frames trickle in one by one ...
    w = h.worker(max_batch=100, max_wait_ms=3_600_000)  # ... and the batch stays open all along

    def promote(c: FakeConsumer) -> None:
        if c.pos[(h.catalog.frames, 0)] == 4 and w.watcher.promoted is None:
            w.watcher.promoted = FakeDetector("2")

    stats = h.run_until_idle(w, promote, batch_done=False)  # the open batch is flushed at shutdown
    assert h.consumer.calls < MAX_CALLS
    assert stats.model_reloads == 1 and w.watcher.swapped_with_pending == [5]  # swapped with 5 frames pending
    assert sorted(i["frame_id"] for i in h.inspections()) == sorted(r["frame_id"] for r in refs)
    assert {i["model_version"] for i in h.inspections()} == {"2"}


class SlowDetector(FakeDetector):
    """Takes ``delay_s`` per batch: the pipeline fills up behind it."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("1")
        self.delay_s = delay_s

    def detect(self, images: list[np.ndarray]) -> list[list[Any]]:
        import time

        time.sleep(self.delay_s)
        return super().detect(images)


def test_full_pipeline_pauses_the_partitions_and_loses_nothing(harness: Harness,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Backpressure: with the in-flight window full for longer than STALL_PAUSE_S the partitions are
    paused (not consumed into an unbounded queue), then resumed; every frame is inspected once, in order."""
    from inference_workers import worker as worker_mod

    monkeypatch.setattr(worker_mod, "STALL_PAUSE_S", 0.05)
    h = harness
    refs = [h.add_frame() for _ in range(8)]
    w = h.worker(max_batch=2, pipeline_depth=1)
    w.watcher.current = SlowDetector(0.25)
    paused_calls: list[set[PartKey]] = []
    real_pause = h.consumer.pause

    def pause(tps: list[TopicPartition]) -> None:
        paused_calls.append({(tp.topic, tp.partition) for tp in tps})
        real_pause(tps)

    h.consumer.pause = pause  # type: ignore[method-assign]
    stats = h.run_until_idle(w)
    k = (h.catalog.frames, 0)
    assert h.consumer.calls < MAX_CALLS
    assert stats.backpressure_pauses >= 1 and {k} in paused_calls and h.consumer.paused == set()
    recs = h.inspections()
    assert [r["frame_id"] for r in recs] == [r["frame_id"] for r in refs]  # once each, in source order
    assert h.consumer.committed == {k: 8} and h.consumer.seeks == []
