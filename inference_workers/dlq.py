"""The dead-letter topic: the original message bytes, why it failed, and where it came from.

Records follow schemas/avro/frame_dlq.avsc; the reason is also in plain headers
(``sqis-error-type``, ``sqis-error-message``, ``sqis-source``) so tools can filter without Avro.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from infra.kafka import KafkaError, Message, Producer, TopicPartition, admin_client, check_broker, watermarks
from infra.kafka import consumer as make_consumer
from infra.settings import Settings
from schemas.catalog import TopicCatalog
from schemas.deadletter import (  # noqa: F401 (re-exported)
    ERROR_MESSAGE_HEADER,
    ERROR_TYPE_HEADER,
    SOURCE_HEADER,
    dead_letter,
    source_label,
)
from schemas.deadletter import dead_letter_record as _dead_letter_record
from schemas.serde import deserialize

log = logging.getLogger(__name__)

UNDECODABLE = "undecodable_message"

DeliveryCallback = Callable[[KafkaError | None, Message], None]


def source_of(msg: Message) -> str:
    """topic[partition]@offset of a consumed message, for logs and errors."""
    return source_label(msg.topic(), msg.partition(), msg.offset())


def dead_letter_record(msg: Message, *, error_type: str, error_message: str, worker_id: str,
                       frame_id: str | None = None, failed_at_us: int | None = None) -> dict[str, Any]:
    """A DeadLetter record holding ``msg``'s original key, value and headers (schemas.deadletter)."""
    return _dead_letter_record(
        source_topic=msg.topic(), source_partition=msg.partition(), source_offset=msg.offset(), key=msg.key(),
        value=msg.value(), headers=msg.headers(), error_type=error_type, error_message=error_message,
        worker_id=worker_id, frame_id=frame_id, failed_at_us=failed_at_us)


class DeadLetterPublisher:
    """Produces DeadLetter records to the DLQ topic; the caller's callback acknowledges the source offset."""

    def __init__(self, producer: Producer, topic: str, worker_id: str) -> None:
        self.producer = producer
        self.topic = topic
        self.worker_id = worker_id

    def publish(self, msg: Message, *, error_type: str, error_message: str, frame_id: str | None,
                on_delivery: DeliveryCallback) -> None:
        value, headers = dead_letter(
            source_topic=msg.topic(), source_partition=msg.partition(), source_offset=msg.offset(), key=msg.key(),
            value=msg.value(), headers=msg.headers(), error_type=error_type, error_message=error_message,
            worker_id=self.worker_id, frame_id=frame_id)
        log.warning("frame dead-lettered", extra={
            "worker_id": self.worker_id, "frame_id": frame_id, "source": source_of(msg),
            "error_type": error_type, "error": error_message})
        self.producer.produce(self.topic, value=value, key=msg.key(), headers=headers, on_delivery=on_delivery)


def read_dead_letters(settings: Settings, *, limit: int | None = None, idle_s: float = 3.0,
                      max_s: float = 60.0) -> Iterator[dict[str, Any]]:
    """DLQ records from the beginning of every partition up to its end taken at the start, oldest
    first per partition: exactly what the topic held then, none written since.

    Uses a read_committed consumer with a throwaway group and assign() (no join, no commit); the end
    of a partition is its last stable offset, so transaction markers and aborted records are passed
    over. Stops after ``limit`` records, at the ends, or, if the broker delivers nothing for
    ``idle_s`` (or ``max_s`` in all) before the ends are reached, with a warning that the read is
    incomplete.
    """
    topic = TopicCatalog(settings.topic_prefix).frames_dlq
    check_broker(settings)  # an unreachable broker is one clear line, not a timeout and client noise
    md = admin_client(settings).list_topics(topic, timeout=10).topics.get(topic)
    if md is None or md.error is not None or not md.partitions:
        return
    c = make_consumer(settings, group_id=f"sqis-dlq-show-{uuid.uuid4().hex[:8]}", client_id="sqis-dlq-show",
                      **{"enable.auto.commit": False, "isolation.level": "read_committed"})
    try:
        ends: dict[int, int] = {}
        for p in md.partitions:
            low, high = watermarks(c, TopicPartition(topic, p), 10.0)
            if high > low:
                ends[p] = high
        c.assign([TopicPartition(topic, p, -2) for p in ends])  # -2: OFFSET_BEGINNING
        n = 0
        start = last = time.monotonic()
        while ends and (limit is None or n < limit):
            now = time.monotonic()
            if now - last > idle_s or now - start > max_s:
                log.warning("DLQ read incomplete: the broker stopped delivering before the end offsets",
                            extra={"topic": topic, "partitions_left": sorted(ends), "records": n})
                return
            msg = c.poll(0.2)
            if msg is not None and msg.error():
                log.warning("DLQ read error", extra={"error": str(msg.error())})
            elif msg is not None and msg.partition() in ends and msg.offset() < ends[msg.partition()]:
                last = time.monotonic()
                n += 1
                yield _dlq_record(msg)
            for tp in c.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:  # reached the end (past any trailing marker)
                    del ends[tp.partition]
                    last = time.monotonic()
    finally:
        c.close()


def _dlq_record(msg: Message) -> dict[str, Any]:
    try:
        rec = deserialize("frame_dlq", msg.value(), msg.headers())
    except Exception as exc:
        rec = {"source_topic": "?", "source_partition": -1, "source_offset": -1, "frame_id": None,
               "error_type": "unreadable_dlq_record", "error_message": str(exc), "failed_at": 0,
               "worker_id": "?"}
    rec["dlq_partition"], rec["dlq_offset"] = msg.partition(), msg.offset()
    return rec


def newest_dead_letters(settings: Settings, *, limit: int, idle_s: float = 3.0,
                        max_s: float = 60.0) -> list[dict[str, Any]]:
    """The ``limit`` most recent DLQ records (by failed_at, then DLQ offset), newest first.

    The topic is read up to its end offsets taken at the start, keeping only ``limit`` records.
    """
    import heapq

    heap: list[tuple[int, int, int, int, dict[str, Any]]] = []
    for i, rec in enumerate(read_dead_letters(settings, idle_s=idle_s, max_s=max_s)):
        item = (int(rec.get("failed_at") or 0), rec["dlq_offset"], rec["dlq_partition"], i, rec)
        if len(heap) < limit:
            heapq.heappush(heap, item)
        else:
            heapq.heappushpop(heap, item)
    return [item[-1] for item in sorted(heap, reverse=True)]


# ---- replay ------------------------------------------------------------------------------------------

REPLAYABLE = ("frames", "inspections")  # catalog keys whose dead letters can go back to their topic


@dataclass(frozen=True)
class ReplayFilter:
    """Which dead letters to replay: every given criterion must match (None: any)."""

    reasons: tuple[str, ...] = ()
    since_us: int | None = None  # failed_at >= since
    until_us: int | None = None  # failed_at < until
    partition: int | None = None  # source partition ...
    from_offset: int | None = None  # ... and source offsets in [from, to]
    to_offset: int | None = None

    def match(self, rec: dict[str, Any]) -> bool:
        if self.reasons and rec.get("error_type") not in self.reasons:
            return False
        failed = int(rec.get("failed_at") or 0)
        if self.since_us is not None and failed < self.since_us:
            return False
        if self.until_us is not None and failed >= self.until_us:
            return False
        if self.partition is not None and rec.get("source_partition") != self.partition:
            return False
        off = int(rec.get("source_offset", -1))
        if self.from_offset is not None and off < self.from_offset:
            return False
        return not (self.to_offset is not None and off > self.to_offset)


@dataclass
class ReplayPlan:
    """What a replay sends (record, target topic) and what it skips (record, why)."""

    send: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    skip: list[tuple[dict[str, Any], str]] = field(default_factory=list)


def plan_replay(settings: Settings, records: Iterable[dict[str, Any]], flt: ReplayFilter) -> ReplayPlan:
    """Choose the dead letters to re-publish: matching, whole (not truncated), from one of our topics."""
    cat = TopicCatalog(settings.topic_prefix)
    targets = {cat.name(k): cat.name(k) for k in REPLAYABLE}
    plan = ReplayPlan()
    for rec in records:
        if not flt.match(rec):
            continue
        value = rec.get("original_value")
        size = rec.get("original_size")
        if rec.get("error_type") == "unreadable_dlq_record" or value is None:
            plan.skip.append((rec, "no original value"))
        elif size is not None and size != len(value):
            plan.skip.append((rec, f"original value truncated ({len(value)} of {size} B kept)"))
        elif rec.get("source_topic") not in targets:
            plan.skip.append((rec, f"source topic {rec.get('source_topic')!r} is not one of this deployment's"))
        else:
            plan.send.append((rec, targets[rec["source_topic"]]))
    return plan


def replay(settings: Settings, plan: ReplayPlan, *, timeout_s: float = 30.0) -> int:
    """Re-publish the planned dead letters with their original key, value and headers (so the frame_id
    and the schema fingerprint are unchanged: the sinks stay effectively-once). Returns the count acked."""
    from infra.kafka import producer as make_producer

    if not plan.send:
        return 0
    p = make_producer(settings, client_id="sqis-dlq-replay")
    acked: list[int] = []
    failed: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            acked.append(1)
        else:
            failed.append(err.str())

    for rec, topic in plan.send:
        headers = [(k, v) for k, v in (rec.get("original_headers") or {}).items()]
        headers.append(("sqis-replayed-from", source_label(rec["source_topic"], rec["source_partition"],
                                                           rec["source_offset"]).encode()))
        while True:
            try:
                p.produce(topic, value=rec["original_value"], key=rec.get("original_key"), headers=headers,
                          on_delivery=on_delivery)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    left = p.flush(timeout_s)
    if left or failed:
        from infra.kafka import BrokerUnavailable

        raise BrokerUnavailable(f"replay: {len(acked)} re-published, {left} unacknowledged, "
                                f"{len(failed)} failed ({failed[:1]})")
    log.info("dead letters replayed", extra={"frames": len(acked)})
    return len(acked)
