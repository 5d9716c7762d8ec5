"""The one consume loop of the sinks and stream processors: poll -> handle a batch -> commit, with one
failure policy.

- Batches: messages are gathered until ``batch_size`` or ``max_wait_s`` after the first one (polls stay
  <= ``poll_s`` so a stop is noticed), then ``on_batch(messages, loop)`` runs; ``on_tick`` runs about
  every ``tick_s`` (wall-clock housekeeping); ``on_stop`` once before the final commit.
- Failed batch: ``on_batch``/``on_tick`` raise :class:`RetryLater` (a durable output is down), or an
  output of the loop's producer was not delivered (e.g. the broker refused a dead letter). The batch is
  given up without storing its offsets: its partitions are rewound to its first offsets, every
  assigned partition is paused, and the loop keeps polling (group membership, rebalances) and tries
  again after a backoff that doubles up to ``max_backoff_s`` (``probe`` checks the output first). One
  warning per outage, one info line when a batch goes through again; outages, paused time and failed
  deliveries are counted in :class:`LoopStats`. An owner whose in-memory state cannot take a replay
  passes ``retry_failed=False``: the failure is then a :class:`LoopError` (the CLI prints one line
  and exits 1; a restart rebuilds from the committed offsets).
- Commits: a :class:`CommitStrategy` decides. The default (at-least-once) stores a batch's offsets once
  its outputs are acknowledged and commits the stored offsets every ``interval_s``, before partitions
  are handed back, and once more on close. :class:`TransactionalCommit` commits each batch's outputs
  and input offsets in one Kafka transaction (begin / send_offsets_to_transaction / commit).
- Rejoin watchdog: a consumer that is out of its group (no member id) for ``kafka_rejoin_timeout_s``
  while a fresh connection to the broker succeeds is closed and made anew. librdkafka >= 2.10 drops
  brokers missing from a Metadata response; a one-node broker that restarts can leave the client with
  no usable broker and no re-bootstrap (confluentinc/librdkafka#5301), a member that never rejoins.
- Shutdown: ``stop()`` (or the shared stop event) ends the loop within one poll; the gathered batch is
  handled, offsets committed, the producer flushed with a bound, the consumer closed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from infra.errors import InfraError
from infra.kafka import BrokerUnavailable, KafkaError, KafkaException, Message, TopicPartition, check_broker
from infra.kafka import consumer as make_consumer
from infra.kafka import producer as make_producer
from infra.kafka_security import denial, denied_message
from infra.settings import Settings

log = logging.getLogger(__name__)

Offsets = dict[tuple[str, int], int]  # (topic, partition) -> next offset to read
CHECK_EVERY_S = 1.0  # the rejoin watchdog reads the member id at most this often
PROBE_EVERY_S = 5.0  # ...and asks the broker at most this often
REJOIN_GRACE_S = 10.0  # the broker answered this long and the consumer is still out: it is wedged


class LoopError(InfraError):
    """The loop cannot go on: a fatal Kafka error, or a failed batch its owner cannot replay."""


class RetryLater(InfraError):  # noqa: N818 - an instruction to the loop, not an error report
    """Raised by ``on_batch``/``on_tick``: a durable output is down and waiting can fix it (the loop
    rewinds the batch, pauses, backs off and retries). The message is the reason, one line."""


@dataclass
class LoopStats:
    consumed: int = 0  # messages received (a replayed message counts again)
    batches: int = 0  # batches handled successfully
    commits: int = 0  # offset commits (or committed transactions)
    commit_failures: int = 0
    failed_batches: int = 0  # batches given up and rewound
    delivery_failures: int = 0  # outputs the producer could not deliver
    outages: int = 0  # times the loop paused (one per outage, however many retries)
    paused_s: float = 0.0  # time spent in those outages


def _tps(offsets: Offsets) -> list[TopicPartition]:
    return [TopicPartition(t, p, o) for (t, p), o in offsets.items()]


class CommitStrategy:
    """At-least-once: a batch's outputs are flushed before its offsets are stored; stored offsets are
    committed every ``interval_s``, before partitions are handed back, and on close.

    The hooks are what a transactional strategy needs too: ``begin`` before a batch, ``complete``
    after it (True: its offsets are committed already), ``abort`` when it failed, ``commit`` for the
    stored offsets."""

    transactional = False

    def __init__(self, interval_s: float = 1.0) -> None:
        self.interval_s = interval_s

    def producer_config(self) -> dict[str, Any]:
        return {}

    def attach(self, loop: ConsumeLoop) -> None:
        """The clients exist (``loop.consumer``, ``loop.producer``)."""

    def begin(self, loop: ConsumeLoop) -> None:
        """Before ``on_batch`` / ``on_tick``."""

    def complete(self, loop: ConsumeLoop, offsets: Offsets) -> bool:
        loop.flush_outputs()
        return False

    def abort(self, loop: ConsumeLoop) -> None:
        """The batch failed: nothing of it may become visible as committed."""

    def commit(self, loop: ConsumeLoop, offsets: Offsets) -> None:
        loop.consumer.commit(offsets=_tps(offsets), asynchronous=False)


class TransactionalCommit(CommitStrategy):
    """Each batch's outputs and input offsets in one Kafka transaction (readers of the outputs use
    isolation.level=read_committed). A failed or aborted batch is retried like any failed batch."""

    transactional = True

    def __init__(self, transactional_id: str, timeout_s: float = 30.0) -> None:
        super().__init__(interval_s=float("inf"))
        self.transactional_id = transactional_id
        self.timeout_s = timeout_s
        self._open = False

    def producer_config(self) -> dict[str, Any]:
        return {"transactional.id": self.transactional_id}

    def attach(self, loop: ConsumeLoop) -> None:
        if loop.producer is None:
            raise LoopError("a transactional commit needs the loop's producer (with_producer=True)")
        loop.producer.init_transactions(self.timeout_s)

    def begin(self, loop: ConsumeLoop) -> None:
        loop.producer.begin_transaction()
        self._open = True

    def complete(self, loop: ConsumeLoop, offsets: Offsets) -> bool:
        p = loop.producer
        try:
            if offsets:
                p.send_offsets_to_transaction(_tps(offsets), loop.consumer.consumer_group_metadata(), self.timeout_s)
            p.commit_transaction(self.timeout_s)
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if err is not None and err.fatal():
                raise LoopError(f"transaction failed for good: {err.str()} ({err.name()})") from None
            raise RetryLater(f"transaction commit failed: {err.str() if err else exc}") from None
        self._open = False
        loop.check_delivered()
        return True

    def abort(self, loop: ConsumeLoop) -> None:
        if self._open:
            self._open = False
            try:
                loop.producer.abort_transaction(self.timeout_s)
            except KafkaException as exc:
                log.warning("transaction abort failed", extra={"error": str(exc), "group": loop.group_id})

    def commit(self, loop: ConsumeLoop, offsets: Offsets) -> None:
        """Nothing to do: offsets are committed inside each batch's transaction."""


class ConsumeLoop:
    def __init__(self, settings: Settings, *, topics: list[str], group_id: str, client_id: str,
                 on_batch: Callable[[list[Message], Any], None], on_tick: Callable[[Any], None] | None = None,
                 on_stop: Callable[[Any], None] | None = None, batch_size: int = 500, poll_s: float = 0.5,
                 max_wait_s: float = 0.0, tick_s: float = 0.5, with_producer: bool = True,
                 stop_event: threading.Event | None = None, defer_commit: bool = False,
                 commit_filter: Callable[[Offsets], Offsets] | None = None,
                 on_assign: Callable[[list[TopicPartition]], None] | None = None,
                 on_revoke: Callable[[list[TopicPartition]], None] | None = None,
                 on_lost: Callable[[list[TopicPartition]], None] | None = None,
                 strategy: CommitStrategy | None = None, retry_failed: bool = True,
                 probe: Callable[[], None] | None = None, max_backoff_s: float = 30.0,
                 producer_client_id: str | None = None, consumer_config: dict[str, Any] | None = None,
                 name: str | None = None, close_timeout_s: float = 10.0) -> None:
        self.settings = settings
        self.topics = topics
        self.group_id = group_id
        self.client_id = client_id
        self.name = name or group_id
        self.last_poll = time.monotonic()  # liveness: the loop is turning (health endpoints)
        self.on_batch, self.on_tick, self.on_stop = on_batch, on_tick, on_stop
        self.batch_size, self.tick_s = max(1, batch_size), tick_s
        self.poll_s = min(1.0, max(0.01, poll_s))
        self.max_wait_s = max(0.0, max_wait_s)
        self.with_producer = with_producer
        self.producer_client_id = producer_client_id or f"{client_id}-out"
        self.consumer_config = consumer_config or {}
        self.strategy = strategy or CommitStrategy()
        if self.strategy.transactional and (defer_commit or commit_filter is not None):
            raise ValueError("a transactional commit commits each batch: no defer_commit / commit_filter")
        # defer_commit: consumed offsets are released for commit only by request_commit() (an owner
        # that buffers rows across batches commits only what it has written)
        self.defer_commit = defer_commit
        # commit_filter: maps the consumed offsets to the ones safe to commit (a processor holding
        # frames in open windows commits only up to the first of them)
        self.commit_filter = commit_filter
        self.retry_failed = retry_failed
        self.probe = probe
        self.max_backoff_s = max_backoff_s
        self.close_timeout_s = close_timeout_s
        self._assign_cb, self._revoke_cb, self._lost_cb = on_assign, on_revoke, on_lost
        self.stop_event = stop_event or threading.Event()
        self.stats = LoopStats()
        self.producer: Any = None
        self.consumer: Any = None
        self._gathered: list[Message] = []  # the batch being gathered
        self._gathered_since = 0.0
        self._consumed: Offsets = {}  # handled successfully
        self._released: Offsets = {}  # (defer_commit) released by request_commit()
        self._committed: Offsets = {}
        self._commit_requested = False
        self._failed: list[str] = []  # delivery failures since the last flush
        self._denied: str | None = None  # the broker refused this principal: the loop ends with it
        self._outage: str | None = None  # why the loop is paused (None: consuming)
        self._outage_since: float | None = None  # None: healthy; set while paused or on trial after it
        self._backoff = 0.0
        self._retry_at = 0.0
        self._closing = False  # close() runs: its final rebalance neither handles nor commits
        self.rejoin_timeout_s = settings.kafka_rejoin_timeout_s
        self._unjoined_since: float | None = None  # out of the group (no member id) since
        self._reachable_since: float | None = None  # ...and fresh clients reach the broker since
        self._rejoin_checked = self._probed = 0.0
        self.recreated = 0  # consumers closed and made anew by the rejoin watchdog

    # -- for owners --------------------------------------------------------------------------------

    @property
    def consumed(self) -> int:
        return self.stats.consumed

    @property
    def commits(self) -> int:
        return self.stats.commits

    @property
    def paused(self) -> str | None:
        """Why the loop is paused now (None: consuming)."""
        return self._outage

    def stop(self) -> None:
        self.stop_event.set()

    def request_commit(self) -> None:
        """(defer_commit) Release every offset handled so far for the next commit (at the end of the
        current batch or tick)."""
        self._commit_requested = True

    def produce(self, topic: str, key: str | bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None,
                *, where: str = "", on_delivered: Callable[[], None] | None = None) -> None:
        """Queue one output; its delivery is checked before the batch's offsets move. ``where`` names
        its source in failure reports; ``on_delivered`` runs once the broker acknowledged it."""
        k = key.encode() if isinstance(key, str) else key

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if err is not None and denial(err):  # no ACL for the output topic: retrying cannot help
                self._on_denied(denied_message(self.settings, err, msg.topic() or topic))
            if err is not None:
                self._failed.append(f"{where or msg.topic()} -> {msg.topic()}: {err.str()} ({err.name()})")
            elif on_delivered is not None:
                on_delivered()

        while True:
            try:
                self.producer.produce(topic, value=value, key=k, headers=headers, on_delivery=on_delivery)
                break
            except BufferError:
                self.producer.poll(0.1)  # local queue full: let deliveries drain
            except KafkaException as exc:  # refused at once (e.g. too large for this client)
                err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
                self._failed.append(f"{where or topic} -> {topic}: {err.str()} ({err.name()})" if err
                                    else f"{where or topic} -> {topic}: {exc}")
                break
        self.producer.poll(0)

    def flush_outputs(self, timeout_s: float = 30.0) -> None:
        """Wait for every queued output; RetryLater naming the failures when some were not delivered."""
        if self.producer is None:
            return
        left = self.producer.flush(timeout_s)
        if left:
            self._failed.append(f"{left} output(s) not acknowledged within {timeout_s:.0f} s")
            with contextlib.suppress(KafkaException, RuntimeError):
                self.producer.purge(in_queue=True, in_flight=False)
                self.producer.poll(0)
        self.check_delivered()

    def check_delivered(self) -> None:
        if self._failed:
            failed, self._failed = self._failed, []
            self.stats.delivery_failures += len(failed)
            raise RetryLater(f"output delivery failed for {len(failed)} record(s): {'; '.join(failed[:3])}")

    # -- the loop ----------------------------------------------------------------------------------

    def run(self, *, max_idle_s: float | None = None, max_messages: int | None = None) -> LoopStats:
        """Consume until stopped, ``max_messages`` handed over, or nothing arrived for ``max_idle_s``
        (a paused loop is not idle). LoopError when it cannot go on."""
        self.consumer = self._new_consumer()  # for callbacks that ask about positions and watermarks
        try:
            if self.with_producer:
                self.producer = make_producer(self.settings, client_id=self.producer_client_id,
                                              **self.strategy.producer_config())
            self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                    on_lost=self._on_lost)
            self.strategy.attach(self)
            log.info("loop started", extra={"topics": self.topics, "group": self.group_id, "client": self.client_id})
            self._loop(max_idle_s, max_messages)
            on_stop = self.on_stop
            if on_stop is not None and self._outage is None:
                self._guarded(lambda: on_stop(self), {}, {})
            self._commit(final=True)  # what was handled, even when stopped while paused
        finally:
            self._close(self.consumer)
        log.info("loop stopped", extra={"group": self.group_id, **self.stats.__dict__})
        return self.stats

    def _new_consumer(self) -> Any:
        return make_consumer(self.settings, group_id=self.group_id, client_id=self.client_id,
                             on_denied=self._on_denied, **({"enable.auto.commit": False} | self.consumer_config))

    def _loop(self, max_idle_s: float | None, max_messages: int | None) -> None:
        last_tick = last_msg = last_commit = time.monotonic()
        while not self.stop_event.is_set():
            if self._denied is not None:
                raise LoopError(self._denied)
            now = self.last_poll = time.monotonic()
            self._rejoin_watchdog(now)
            cons = self.consumer
            if self._outage is not None:
                self._outage_turn(cons)
                last_msg = time.monotonic()  # a paused loop is not idle
                continue
            timeout = self.poll_s
            if self._gathered:
                timeout = min(timeout, max(0.0, self._gathered_since + self.max_wait_s - now))
            msgs = cons.consume(self.batch_size - len(self._gathered), timeout)
            now = time.monotonic()
            for m in msgs:
                err = m.error()
                if err is None:
                    if not self._gathered:
                        self._gathered_since = now
                    self._gathered.append(m)
                    self.stats.consumed += 1
                else:
                    self._kafka_error(err, m.topic())
            if msgs:
                last_msg = now
            if self._gathered and (len(self._gathered) >= self.batch_size
                                   or now - self._gathered_since >= self.max_wait_s):
                self._dispatch()
            if self.on_tick is not None and self._outage is None and now - last_tick >= self.tick_s:
                last_tick = now
                self._guarded(self._tick, {}, {})
            if self._outage is None and (self._commit_requested or now - last_commit >= self.strategy.interval_s):
                last_commit = now
                self._commit()
            if max_messages is not None and self.stats.consumed >= max_messages:
                break
            if max_idle_s is not None and not self._gathered and now - last_msg >= max_idle_s:
                break
        if self._gathered and self._outage is None:
            self._dispatch()  # the batch gathered so far is handled before the final commit

    def _tick(self) -> None:
        if self.on_tick is not None:
            self.on_tick(self)

    # -- the rejoin watchdog -----------------------------------------------------------------------

    def _rejoin_watchdog(self, now: float) -> None:
        """A consumer out of its group (no member id) for ``rejoin_timeout_s``, while fresh clients have
        reached the broker for REJOIN_GRACE_S (librdkafka rejoins within seconds of a broker's return
        when it can), is wedged: close it and subscribe a new one. The broker is asked at most every
        PROBE_EVERY_S, and only once the member id has been missing for ``rejoin_timeout_s``."""
        if now - self._rejoin_checked < CHECK_EVERY_S:
            return
        self._rejoin_checked = now
        try:
            joined = bool(self.consumer.memberid())
        except (KafkaException, RuntimeError):
            joined = False
        if joined or self._gathered:
            self._unjoined_since = self._reachable_since = None
            return
        if self._unjoined_since is None:
            self._unjoined_since = now
        if now - self._unjoined_since < self.rejoin_timeout_s or now - self._probed < PROBE_EVERY_S:
            return
        self._probed = now
        if not _broker_answers(self.settings):
            self._reachable_since = None  # an outage: librdkafka rejoins by itself once the broker is back
            return
        if self._reachable_since is None:
            self._reachable_since = now
        if now - self._reachable_since < REJOIN_GRACE_S:
            return
        log.warning("%s: consumer out of group %s for %.0f s while the broker answers; making a new one",
                    self.name, self.group_id, now - self._unjoined_since,
                    extra={"group": self.group_id, "client": self.client_id})
        old, self._unjoined_since, self._reachable_since = self.consumer, None, None
        self._forget(list(_tps(dict(self._consumed))))
        _close_bounded(old, self.close_timeout_s, self.group_id)
        self.consumer = self._new_consumer()
        self.consumer.subscribe(self.topics, on_assign=self._on_assign, on_revoke=self._on_revoke,
                                on_lost=self._on_lost)
        self.recreated += 1

    def _on_denied(self, line: str) -> None:
        """The broker refused this principal (credentials or ACL): the loop ends with that line."""
        if self._denied is None:
            self._denied = line

    def _kafka_error(self, err: KafkaError, topic: str | None = None) -> None:
        kind = denial(err)
        if kind:  # no credentials or ACL: one line and stop, never a retry storm
            what = self.group_id if kind == "group" else (topic or ", ".join(self.topics))
            raise LoopError(denied_message(self.settings, err, what))
        if err.fatal():
            raise LoopError(f"fatal Kafka error in {self.name}: {err.str()} ({err.name()})")
        if err.code() != KafkaError._PARTITION_EOF:
            log.warning("kafka error", extra={"error": str(err), "group": self.group_id})

    def _dispatch(self) -> None:
        msgs, self._gathered = self._gathered, []
        first: Offsets = {}
        offsets: Offsets = {}
        for m in msgs:
            k = (m.topic(), m.partition())
            first[k] = min(first.get(k, m.offset()), m.offset())
            offsets[k] = max(offsets.get(k, -1), m.offset() + 1)
        self._guarded(lambda: self.on_batch(msgs, self), offsets, first)

    def _guarded(self, call: Callable[[], None], offsets: Offsets, first: Offsets) -> None:
        """Run a batch (or a tick) under the commit strategy; a RetryLater becomes an outage."""
        try:
            self.strategy.begin(self)
            call()
            committed = self.strategy.complete(self, offsets)
        except RetryLater as exc:
            self.strategy.abort(self)
            self._fail(str(exc), first)
            return
        except BaseException:
            self.strategy.abort(self)
            raise
        for k, v in offsets.items():
            self._consumed[k] = max(self._consumed.get(k, -1), v)
        if committed and offsets:
            self._committed.update(offsets)
            self.stats.commits += 1
        if offsets:
            self.stats.batches += 1
        if self._commit_requested and self.defer_commit:
            self._released = dict(self._consumed)
        if self._outage_since is not None and offsets:  # the first batch through after an outage
            paused = time.monotonic() - self._outage_since
            self.stats.paused_s += paused
            self._outage_since = None
            log.info("%s resumed after %.1f s paused", self.name, paused, extra={"group": self.group_id})

    # -- outages: rewind, pause, back off, retry ---------------------------------------------------

    def _fail(self, why: str, first: Offsets) -> None:
        self.stats.failed_batches += 1
        if not self.retry_failed:
            raise LoopError(f"{self.name}: {why}")
        self._failed = []
        for (topic, part), off in first.items():
            try:
                self.consumer.seek(TopicPartition(topic, part, off))
            except KafkaException as exc:  # revoked meanwhile: the new owner starts at the commit
                log.debug("rewind skipped", extra={"partition": part, "error": str(exc)})
        self._pause_all()
        now = time.monotonic()
        if self._outage_since is None:
            self._outage_since = now
            self.stats.outages += 1
            self._backoff = min(1.0, self.max_backoff_s)
            log.warning("%s paused: %s; retrying with backoff, nothing is committed meanwhile", self.name, why,
                        extra={"group": self.group_id, "rewound": {f"{t}[{p}]": o for (t, p), o in first.items()}})
        else:  # still failing (a retry after the pause): the same outage, a longer wait
            self._backoff = min(self._backoff * 2, self.max_backoff_s)
            log.debug("still failing", extra={"group": self.group_id, "error": why, "next_try_s": self._backoff})
        self._outage = why
        self._retry_at = now + self._backoff

    def _pause_all(self) -> None:
        try:
            assigned = self.consumer.assignment()
            if assigned:
                self.consumer.pause(assigned)
        except KafkaException as exc:
            log.debug("pause failed", extra={"error": str(exc)})

    def _outage_turn(self, cons: Any) -> None:
        """One turn while paused: poll (group membership, rebalances), retry when due."""
        msg = cons.poll(min(self.poll_s, max(0.05, self._retry_at - time.monotonic())))
        if msg is not None:
            if msg.error():
                self._kafka_error(msg.error())
            else:  # a partition assigned before it could be paused: put the message back
                with contextlib.suppress(KafkaException):
                    cons.seek(TopicPartition(msg.topic(), msg.partition(), msg.offset()))
                self._pause_all()
        if time.monotonic() < self._retry_at or self.stop_event.is_set():
            return
        if self.probe is not None:
            try:
                self.probe()
            except Exception as exc:  # noqa: BLE001 - any failure of the probe means: still down
                self._backoff = min(self._backoff * 2, self.max_backoff_s)
                self._retry_at = time.monotonic() + self._backoff
                log.debug("still unavailable", extra={"group": self.group_id, "error": str(exc),
                                                      "next_try_s": self._backoff})
                return
        log.debug("retrying after outage", extra={"group": self.group_id, "reason": self._outage})
        self._outage = None  # on trial: the outage ends when a batch goes through
        with contextlib.suppress(KafkaException):
            assigned = cons.assignment()
            if assigned:
                cons.resume(assigned)

    # -- commits and rebalances --------------------------------------------------------------------

    def _committable(self) -> Offsets:
        if self.defer_commit:
            return dict(self._released)
        if self.commit_filter is not None:
            return self.commit_filter(dict(self._consumed))
        return dict(self._consumed)

    def _commit(self, *, final: bool = False, only: set[tuple[str, int]] | None = None) -> None:
        self._commit_requested = False
        if self.strategy.transactional:
            return
        offsets = {k: v for k, v in self._committable().items()
                   if v > self._committed.get(k, -1) and (only is None or k in only)}
        if not offsets:
            return
        try:
            self.strategy.commit(self, offsets)
        except KafkaException as exc:
            # e.g. a rebalance took the partitions: what was handled is redelivered to the new owner
            self.stats.commit_failures += 1
            log.warning("offset commit failed", extra={"error": str(exc), "group": self.group_id, "final": final})
            return
        self._committed.update(offsets)
        self.stats.commits += 1

    def _forget(self, partitions: list[TopicPartition]) -> None:
        gone = {(tp.topic, tp.partition) for tp in partitions}
        for d in (self._consumed, self._released, self._committed):
            for k in gone:
                d.pop(k, None)

    def _on_assign(self, _c: Any, partitions: list[TopicPartition]) -> None:
        log.info("partitions assigned", extra={"group": self.group_id, "partitions": [p.partition for p in partitions]})
        if self._outage is not None and partitions:
            with contextlib.suppress(KafkaException):
                self.consumer.pause(partitions)
        if self._assign_cb is not None:
            self._assign_cb(partitions)

    def _on_revoke(self, _c: Any, partitions: list[TopicPartition]) -> None:
        # hand back cleanly: the gathered batch is handled and what is handled committed before the move
        log.info("partitions revoked", extra={"group": self.group_id, "partitions": [p.partition for p in partitions]})
        if self._gathered and self._outage is None and not self._closing:
            self._dispatch()
        gone = {(tp.topic, tp.partition) for tp in partitions}
        if not self._closing:
            self._commit(only=gone)
        self._gathered = [m for m in self._gathered if (m.topic(), m.partition()) not in gone]
        self._forget(partitions)
        if self._revoke_cb is not None:
            self._revoke_cb(partitions)

    def _on_lost(self, _c: Any, partitions: list[TopicPartition]) -> None:
        # another member may own them already: the gathered batch is still handled (idempotent
        # outputs), its offsets are not ours to commit
        log.warning("partitions lost", extra={"group": self.group_id, "partitions": [p.partition for p in partitions]})
        if self._gathered and self._outage is None and not self._closing:
            self._dispatch()
        self._forget(partitions)
        if self._lost_cb is not None:
            self._lost_cb(partitions)
        elif self._revoke_cb is not None:
            self._revoke_cb(partitions)

    def _close(self, cons: Any) -> None:
        # an abandoned batch (stopped while paused) is redelivered later: close()'s final rebalance
        # must not handle it again
        self._gathered = []
        self._closing = True
        if self.producer is not None:
            left = self.producer.flush(self.close_timeout_s)
            if left:
                log.warning("outputs not delivered at close", extra={"group": self.group_id, "left": left})
        try:
            cons.close()
        except (KafkaException, RuntimeError) as exc:
            log.warning("consumer close failed", extra={"error": str(exc), "group": self.group_id})
        self.producer = None  # librdkafka handles are freed with the objects
        self.consumer = None


def _broker_answers(settings: Settings) -> bool:
    """Does a fresh client get metadata from the broker now? (the rejoin watchdog's probe)"""
    try:
        check_broker(settings, timeout_s=1.0)
        return True
    except (BrokerUnavailable, InfraError):
        return False


def _close_bounded(cons: Any, timeout_s: float, group: str) -> None:
    """Close a wedged consumer on a thread of its own: a close that blocks (no usable broker) is left
    behind after ``timeout_s`` instead of stopping the loop."""
    def close() -> None:
        with contextlib.suppress(KafkaException, RuntimeError):
            cons.close()

    t = threading.Thread(target=close, name=f"close-{group}", daemon=True)
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        log.warning("wedged consumer did not close in time; left behind", extra={"group": group})
