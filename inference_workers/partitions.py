"""Partition control of the inference worker: what it owns, which offset it reads next, and when.

Rebalance callbacks (assign, revoke, lost), rewinds (re-consume from an offset after a backoff, with
the partition's epoch bumped so in-flight results of the old epoch are dropped), pause/resume for
backoffs and backpressure, and the filter that skips messages fetched before a seek.

A mixin of :class:`inference_workers.worker.InferenceWorker`: the state (``parts``, ``offsets``,
``batcher``, the consumer) lives on the worker and is declared in its ``__init__``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from inference_workers.results import WorkerError
from inference_workers.stages import PartKey
from infra import kafka
from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.kafka_security import denial, denied_message

if TYPE_CHECKING:
    from inference_workers.worker import InferenceWorker

log = logging.getLogger("inference_workers.worker")


def _key(msg: Message) -> PartKey:
    return (msg.topic(), msg.partition())


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



class PartitionControl:
    """Rebalance, rewind and pause handling of the worker's partitions (see the module docstring)."""

    def _idle_wait(self: InferenceWorker) -> float:
        """How long an idle poll may block: 1 s, less when a paused partition's backoff runs out sooner
        (a blocking poll must not stretch every rewind backoff by up to a second)."""
        now = time.monotonic()
        due = [st.resume_at - now for st in self.parts.values() if st.resume_at is not None]
        return max(0.0, min([1.0, *due]))

    def _accept(self: InferenceWorker, m: Message) -> bool:
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

    def _on_assign(self: InferenceWorker, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.parts.setdefault((tp.topic, tp.partition), PartitionState((tp.topic, tp.partition)))
        log.info("partitions assigned", extra=self.log_extra | {
            "partitions": [f"{tp.topic}[{tp.partition}]" for tp in partitions]})

    def _on_revoke(self: InferenceWorker, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
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

    def _on_lost(self: InferenceWorker, consumer: kafka.Consumer, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        dropped = self._drop_pending(keys)
        self._resume_paused(consumer, keys)
        self._forget(keys)
        log.warning("partitions lost", extra=self.log_extra | {
            "partitions": sorted(f"{t}[{p}]" for t, p in keys), "dropped_unprocessed": dropped})

    def _drop_pending(self: InferenceWorker, keys: set[PartKey]) -> int:
        """Forget what was consumed from ``keys`` and not produced yet: batcher items, in-flight batches."""
        dropped = self.batcher.drop(lambda m: _key(m) in keys)
        for m in dropped:
            self.offsets.untrack_from(_key(m), m.offset())
        in_flight = sum(1 for j in self._inflight for f in j.frames if f.key in keys)
        for k in keys:
            if k in self.parts:
                self.parts[k].epoch += 1  # their in-flight results are dropped at completion
        return len(dropped) + in_flight

    def _resume_paused(self: InferenceWorker, consumer: kafka.Consumer, keys: set[PartKey]) -> None:
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

    def _forget(self: InferenceWorker, keys: set[PartKey]) -> None:
        self.offsets.forget(keys)
        for k in keys:
            self.parts.pop(k, None)
            self._committed.pop(k, None)
        self.metrics.store_unavailable.set(sum(st.store_down for st in self.parts.values()))

    def _rewind(self: InferenceWorker, k: PartKey, offset: int, why: str, *, reason: str) -> None:
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

    def _sync_pauses(self: InferenceWorker) -> None:
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

