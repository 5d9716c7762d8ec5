"""A small at-least-once consume loop shared by the stream processors and the alert/object sinks.

``poll`` in batches (<= ``poll_s`` so signals are noticed) -> ``on_batch(messages)`` -> flush the
producer -> store and commit the batch's offsets; ``on_tick`` runs about every ``tick_s`` (wall-clock
housekeeping such as closing idle windows); ``on_stop`` runs once before the final commit.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from infra.kafka import KafkaError, KafkaException, Message, TopicPartition
from infra.kafka import consumer as make_consumer
from infra.kafka import producer as make_producer
from infra.settings import Settings

log = logging.getLogger(__name__)


class LoopError(RuntimeError):
    """The loop cannot make progress (fatal Kafka error, output not delivered)."""


class ConsumeLoop:
    def __init__(self, settings: Settings, *, topics: list[str], group_id: str, client_id: str,
                 on_batch: Callable[[list[Message], Any], None], on_tick: Callable[[Any], None] | None = None,
                 on_stop: Callable[[Any], None] | None = None, batch_size: int = 500, poll_s: float = 0.5,
                 tick_s: float = 0.5, with_producer: bool = True, stop_event: threading.Event | None = None,
                 defer_commit: bool = False,
                 commit_filter: Callable[[dict[tuple[str, int], int]], dict[tuple[str, int], int]] | None = None,
                 on_assign: Callable[[list[TopicPartition]], None] | None = None,
                 on_revoke: Callable[[list[TopicPartition]], None] | None = None) -> None:
        self.settings = settings
        self.topics = topics
        self.last_poll = time.monotonic()  # liveness: the loop is turning (health endpoints)
        self.group_id = group_id
        self.client_id = client_id
        self.on_batch, self.on_tick, self.on_stop = on_batch, on_tick, on_stop
        self.batch_size, self.poll_s, self.tick_s = batch_size, poll_s, tick_s
        self.with_producer = with_producer
        # defer_commit: offsets wait until the owner calls request_commit() (a sink that buffers
        # rows across batches commits only what it has written)
        self.defer_commit = defer_commit
        self._pending: dict[tuple[str, int], int] = {}
        self._commit_requested = False
        # commit_filter: maps the offsets consumed so far to the ones safe to commit (a processor
        # holding frames in open windows commits only up to the first of them)
        self.commit_filter = commit_filter
        self._committed: dict[tuple[str, int], int] = {}
        self._assign_cb, self._revoke_cb = on_assign, on_revoke
        self.stop_event = stop_event or threading.Event()
        self.producer: Any = None
        self.consumer: Any = None
        self.consumed = 0
        self.commits = 0
        self._failed: list[str] = []

    def produce(self, topic: str, key: str, value: bytes, headers: list[tuple[str, bytes]]) -> None:
        while True:
            try:
                self.producer.produce(topic, value=value, key=key.encode(), headers=headers, on_delivery=self._delivered)
                break
            except BufferError:
                self.producer.poll(0.1)
        self.producer.poll(0)

    def _delivered(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self._failed.append(f"{msg.topic()}: {err}")

    def stop(self) -> None:
        self.stop_event.set()

    def request_commit(self) -> None:
        """(defer_commit) Commit every offset consumed so far at the end of the current batch or tick."""
        self._commit_requested = True

    def run(self, *, max_idle_s: float | None = None) -> None:
        cons = make_consumer(self.settings, group_id=self.group_id, client_id=self.client_id,
                             **{"enable.auto.commit": False})
        if self.with_producer:
            # non-idempotent: tansu and restarts; the outputs are idempotent by key downstream
            self.producer = make_producer(self.settings, client_id=f"{self.client_id}-out", idempotent=False)
        self.consumer = cons  # for callbacks that ask about positions and watermarks
        cons.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke)
        log.info("loop started", extra={"topics": self.topics, "group": self.group_id, "client": self.client_id})
        last_tick = last_msg = time.monotonic()
        try:
            while not self.stop_event.is_set():
                self.last_poll = time.monotonic()
                msgs = cons.consume(self.batch_size, self.poll_s)
                good = []
                for m in msgs:
                    err = m.error()
                    if err is None:
                        good.append(m)
                    elif err.fatal():
                        raise LoopError(f"fatal Kafka error: {err}")
                    elif err.code() != KafkaError._PARTITION_EOF:
                        log.warning("kafka error", extra={"error": str(err), "group": self.group_id})
                now = time.monotonic()
                if good:
                    last_msg = now
                    self.consumed += len(good)
                    self.on_batch(good, self)
                ticked = False
                if self.on_tick is not None and now - last_tick >= self.tick_s:
                    last_tick = now
                    ticked = True
                    self.on_tick(self)
                if good or self._commit_requested or (ticked and self.commit_filter is not None and self._pending):
                    self._commit(cons, good)
                if max_idle_s is not None and now - last_msg >= max_idle_s:
                    break
            if self.on_stop is not None:
                self.on_stop(self)
            self._flush()
            if self._commit_requested or (self.commit_filter is not None and self._pending):
                self._commit(cons, [])
        finally:
            try:
                cons.close()
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed", extra={"error": str(exc)})
            if self.producer is not None:
                self.producer.flush(10)
                self.producer = None  # librdkafka handles are freed with the object
        log.info("loop stopped", extra={"group": self.group_id, "consumed": self.consumed, "commits": self.commits})

    def _on_assign(self, _c: Any, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"group": self.group_id, "partitions": len(partitions)})
        if self._assign_cb is not None:
            self._assign_cb(partitions)

    def _on_revoke(self, _c: Any, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self._committed.pop((tp.topic, tp.partition), None)
            self._pending.pop((tp.topic, tp.partition), None)
        log.info("partitions revoked", extra={"group": self.group_id, "partitions": len(partitions)})
        if self._revoke_cb is not None:
            self._revoke_cb(partitions)

    def _flush(self) -> None:
        if self.producer is None:
            return
        left = self.producer.flush(30)
        if left or self._failed:
            failed, self._failed = self._failed, []
            raise LoopError(f"output delivery failed ({left} pending): {failed[:3]}")

    def _commit(self, cons: Any, msgs: list[Message]) -> None:
        self._flush()  # outputs of the batch are acknowledged before its offsets move
        offsets = self._pending
        for m in msgs:
            k = (m.topic(), m.partition())
            offsets[k] = max(offsets.get(k, -1), m.offset() + 1)
        if self.defer_commit and not self._commit_requested:
            return
        self._pending, self._commit_requested = {}, False
        if self.commit_filter is not None:
            self._pending = dict(offsets)  # keep the consumed positions: the filter decides each time
            offsets = {k: v for k, v in self.commit_filter(offsets).items() if v > self._committed.get(k, -1)}
        if not offsets:
            return
        self._committed.update(offsets)
        tps = [TopicPartition(t, p, o) for (t, p), o in offsets.items()]
        try:
            cons.commit(offsets=tps, asynchronous=False)
            self.commits += 1
        except KafkaException as exc:
            log.warning("offset commit failed", extra={"error": str(exc), "group": self.group_id})
