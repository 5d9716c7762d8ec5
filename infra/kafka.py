"""The one module that touches confluent-kafka: client factories, topic admin, a consume loop.

Settings follow ../shared/LOCAL-KAFKA.md: topics are created explicitly, auto-creation is off,
offsets are *stored* only after a message's result is delivered and committed on an interval
(plus a final synchronous commit on close), polls are <= 1 s so signals are noticed.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import (
    AdminClient,
    AlterConfigOpType,
    ConfigEntry,
    ConfigResource,
    NewTopic,
    ResourceType,
)

from infra.errors import InfraError
from infra.settings import Settings
from schemas.catalog import TopicCatalog

log = logging.getLogger(__name__)

__all__ = [
    "Consumer", "KafkaError", "KafkaException", "Message", "Producer", "TopicPartition",
    "AccessDenied", "BrokerUnavailable", "TopicDrift", "admin_client", "check_broker", "consumer", "create_topics", "delete_topics",
    "producer", "verify_topics", "wait_for_broker",
]


class BrokerUnavailable(InfraError):
    """No broker answered: one clear line for the operator (the CLI exits 1 with it)."""


class AccessDenied(BrokerUnavailable):
    """The broker refused this principal (bad credentials, or no ACL): retrying cannot help."""


class _OncePerWindow(logging.Filter):
    """Lets a client log line through once per ``window_s`` per distinct text (digits ignored), so an
    unreachable broker yields one line a minute, not librdkafka's thousands."""

    def __init__(self, window_s: float = 60.0) -> None:
        super().__init__()
        self.window_s = window_s
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = re.sub(r"\d+", "#", record.getMessage())
        now = time.monotonic()
        with self._lock:
            if now - self._seen.get(key, -1e9) < self.window_s:
                return False
            if len(self._seen) > 1000:
                self._seen.clear()
            self._seen[key] = now
        return True


client_log = logging.getLogger("infra.kafka.client")
client_log.addFilter(_OncePerWindow())


def _on_client_error(err: KafkaError) -> None:
    client_log.warning("kafka client: %s", err.str(), extra={"code": err.name(), "fatal": err.fatal()})


def _common(settings: Settings) -> dict[str, Any]:
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap(),
        "security.protocol": settings.kafka_security_protocol,
        # librdkafka's log and error lines go through Python logging, de-duplicated (see _OncePerWindow)
        "logger": client_log,
        "error_cb": _on_client_error,
    }
    if settings.kafka_ssl_ca_location:
        conf["ssl.ca.location"] = settings.kafka_ssl_ca_location
    if settings.kafka_sasl_mechanism:
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username or ""
        conf["sasl.password"] = (
            settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""
        )
    return conf


def _denial_cb(settings: Settings, on_denied: Callable[[str], None]) -> Callable[[KafkaError], None]:
    """An error_cb that logs like the default one and calls ``on_denied`` with one line when the
    broker rejects the credentials (librdkafka would otherwise retry them for ever, quietly)."""

    def cb(err: KafkaError) -> None:
        _on_client_error(err)
        if denial(err) == "authentication":
            on_denied(denied_message(settings, err))

    return cb


def admin_client(settings: Settings, **overrides: Any) -> AdminClient:
    """An admin client; overrides are extra librdkafka settings (e.g. log_level=3 while probing)."""
    return AdminClient(_common(settings) | overrides)


_LEADER_MOVING = ("NOT_LEADER_FOR_PARTITION", "LEADER_NOT_AVAILABLE", "UNKNOWN_TOPIC_OR_PART", "NOT_LEADER_OR_FOLLOWER")


def watermarks(c: Consumer, tp: TopicPartition, timeout: float = 10.0) -> tuple[int, int]:
    """A partition's low and high watermarks, fetched from its leader; a partition whose leader is not
    known yet (a topic created a moment ago, a leader moving) is asked again until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.get_watermark_offsets(tp, timeout=max(0.5, deadline - time.monotonic()), cached=False)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.name() in _LEADER_MOVING) or time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def check_broker(settings: Settings, timeout_s: float = 5.0, *, topics: Iterable[str] = ()) -> None:
    """One metadata request; BrokerUnavailable (one line) when no broker answers within ``timeout_s``;
    AccessDenied when the broker refuses the credentials, or this principal any of ``topics``."""
    boot = settings.bootstrap()
    seen: list[KafkaError] = []
    admin = admin_client(settings, log_level=0, error_cb=seen.append)
    try:
        admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serve the error callbacks: they say *why* (authentication, TLS, DNS)

        refused = [e for e in seen if denial(e) == "authentication"]
        if refused:
            raise AccessDenied(denied_message(settings, refused[-1])) from None
        auth = [e for e in seen if e.code() == KafkaError._AUTHENTICATION or "SASL" in e.str()
                or "SSL" in e.str()]
        if auth:
            raise BrokerUnavailable(f"Kafka at {boot} refused the connection: {auth[-1].str()}; check "
                                    "SQIS_KAFKA_SECURITY_PROTOCOL / SQIS_KAFKA_SASL_* settings") from None
        err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
        why = err.str() if err is not None else str(exc)
        raise BrokerUnavailable(f"Kafka at {boot} is unreachable ({why}); check --bootstrap / "
                                "SQIS_KAFKA_BOOTSTRAP, or `sqis stack status`") from None
    for topic in topics:  # asked for by name, a topic without a DESCRIBE ACL answers with its refusal
        md = admin.list_topics(topic=topic, timeout=timeout_s).topics.get(topic)
        if md is not None and md.error is not None:

            if denial(md.error):
                raise AccessDenied(denied_message(settings, md.error, topic))


def wait_for_broker(settings: Settings, max_wait_s: float, *, stop: threading.Event | None = None,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Retry :func:`check_broker` quietly with backoff (one warning) until it answers or ``max_wait_s``
    passed; then BrokerUnavailable."""
    deadline = time.monotonic() + max_wait_s
    delay, warned = 1.0, False
    while True:
        try:
            check_broker(settings, timeout_s=min(5.0, max(0.5, deadline - time.monotonic())))
            if warned:
                log.info("Kafka reachable again", extra={"bootstrap": settings.bootstrap()})
            return
        except AccessDenied:
            raise  # wrong credentials stay wrong: no retries
        except BrokerUnavailable as exc:
            if time.monotonic() + delay > deadline or (stop is not None and stop.is_set()):
                raise
            if not warned:
                log.warning("%s; retrying with backoff for up to %.0f s", exc, max_wait_s)
                warned = True
            sleep(delay)
            delay = min(delay * 2, 30.0)


def producer(settings: Settings, *, client_id: str, idempotent: bool = True, **overrides: Any) -> Producer:
    """A producer with acks=all, idempotent by default; pass ``**{"transactional.id": ...}`` for transactions."""
    conf = _common(settings) | {
        "client.id": client_id,
        "acks": "all",
        "enable.idempotence": idempotent,
        "linger.ms": 5,
        "compression.type": "lz4",
        "message.max.bytes": settings.kafka_max_message_bytes,
        "message.timeout.ms": 30000,
        "queue.buffering.max.messages": 100000,
    }
    conf.update(overrides)
    return Producer(conf)


def consumer(settings: Settings, *, group_id: str, client_id: str,
             on_denied: Callable[[str], None] | None = None, **overrides: Any) -> Consumer:
    """A consumer that commits only offsets stored explicitly after processing, and reads only committed
    transactional records (``isolation.level=read_committed``: aborted results of a crashed worker never
    show); ``on_denied(line)`` is called (from poll) when the broker rejects the credentials."""
    conf = _common(settings) | {
        "group.id": group_id,
        "client.id": client_id,
        "enable.auto.commit": True,
        "auto.commit.interval.ms": 1000,
        "enable.auto.offset.store": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        "allow.auto.create.topics": False,
        "session.timeout.ms": settings.kafka_session_timeout_ms,
        "heartbeat.interval.ms": settings.kafka_heartbeat_interval_ms,
        "max.poll.interval.ms": 300000,
        "partition.assignment.strategy": "cooperative-sticky",
        "fetch.message.max.bytes": settings.kafka_max_message_bytes,
        "message.max.bytes": settings.kafka_max_message_bytes,
    }
    if on_denied is not None:
        conf["error_cb"] = _denial_cb(settings, on_denied)
    conf.update(overrides)
    return Consumer(conf)


@dataclass(frozen=True)
class TopicDrift:
    """One difference between a catalog topic and the broker: ``item`` is ``exists``, ``partitions`` or a
    config name; ``expected`` / ``actual`` as strings (actual None: the topic is missing)."""

    topic: str
    item: str
    expected: str
    actual: str | None


def _expected(catalog: TopicCatalog, replication: int, partitions: dict[str, int] | None,
              ) -> dict[str, tuple[int, dict[str, str]]]:
    return {name: ((partitions or {}).get(t.key, t.partitions), t.configs(replication)) for name, t in catalog.all()}


def _config_drift(admin: AdminClient, expected: dict[str, dict[str, str]], timeout: float) -> list[TopicDrift]:
    """Configs of existing topics that differ from ``expected`` (one DescribeConfigs for all topics)."""
    if not expected:
        return []
    futs = admin.describe_configs([ConfigResource(ResourceType.TOPIC, n) for n in expected],
                                  request_timeout=timeout)
    out = []
    for res, fut in futs.items():
        actual = fut.result(timeout=timeout)
        for key, want in expected[res.name].items():
            have = actual[key].value if key in actual else None
            if have != want:
                out.append(TopicDrift(res.name, key, want, have))
    return out


def create_topics(settings: Settings, catalog: TopicCatalog | None = None, *,
                  replication: int | None = None, partitions: dict[str, int] | None = None,
                  timeout: float = 15.0) -> list[str]:
    """Create every catalog topic that does not exist yet, with its configs; returns the names created.

    A topic that exists but whose configs drifted from the catalog (retention.ms, max.message.bytes,
    cleanup.policy, min.insync.replicas) is altered back (IncrementalAlterConfigs) and each change
    logged. Partition counts are only reported by :func:`verify_topics`, never changed here.
    ``partitions`` overrides the catalog's partition count per logical topic key.
    """
    catalog = catalog or TopicCatalog(settings.topic_prefix)
    replication = replication or settings.kafka_replication_factor
    admin = admin_client(settings)
    existing = set(admin.list_topics(timeout=timeout).topics)
    expected = _expected(catalog, replication, partitions)
    new = [NewTopic(name, num_partitions=n, replication_factor=replication, config=conf)
           for name, (n, conf) in expected.items() if name not in existing]
    created = []
    if new:
        for name, fut in admin.create_topics(new, request_timeout=timeout).items():
            try:
                fut.result()
                created.append(name)
            except KafkaException as exc:
                if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                    raise
    drift = _config_drift(admin, {n: conf for n, (_, conf) in expected.items() if n in existing}, timeout)
    if drift:
        _repair_configs(admin, drift, timeout)
    _wait_for_topics(admin, [t.topic for t in new], timeout)
    return created


def _repair_configs(admin: AdminClient, drift: list[TopicDrift], timeout: float) -> None:
    by_topic: dict[str, list[TopicDrift]] = {}
    for d in drift:
        by_topic.setdefault(d.topic, []).append(d)
    resources = [ConfigResource(ResourceType.TOPIC, topic, incremental_configs=[
        ConfigEntry(d.item, d.expected, incremental_operation=AlterConfigOpType.SET) for d in ds])
        for topic, ds in by_topic.items()]
    for res, fut in admin.incremental_alter_configs(resources, request_timeout=timeout).items():
        fut.result(timeout=timeout)
        for d in by_topic[res.name]:
            log.warning("topic config drifted; set back to the catalog's",
                        extra={"topic": d.topic, "config": d.item, "was": d.actual, "now": d.expected})


def verify_topics(settings: Settings, catalog: TopicCatalog | None = None, *, replication: int | None = None,
                  partitions: dict[str, int] | None = None, timeout: float = 15.0) -> list[TopicDrift]:
    """Compare every catalog topic with the broker: missing topics, partition counts, configs.

    Returns the differences (empty: all as declared). Reads only (Metadata + DescribeConfigs).
    """
    catalog = catalog or TopicCatalog(settings.topic_prefix)
    replication = replication or settings.kafka_replication_factor
    admin = admin_client(settings)
    md = admin.list_topics(timeout=timeout).topics
    expected = _expected(catalog, replication, partitions)
    out: list[TopicDrift] = []
    present: dict[str, dict[str, str]] = {}
    for name, (n, conf) in expected.items():
        t = md.get(name)
        if t is None or t.error is not None:
            out.append(TopicDrift(name, "exists", "yes", None))
            continue
        if len(t.partitions) != n:
            out.append(TopicDrift(name, "partitions", str(n), str(len(t.partitions))))
        present[name] = conf
    return out + _config_drift(admin, present, timeout)


def _wait_for_topics(admin: AdminClient, names: Iterable[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    names = set(names)
    while names and time.monotonic() < deadline:
        md = admin.list_topics(timeout=timeout).topics
        names -= {n for n in names if n in md and not md[n].error and md[n].partitions}
        if names:
            time.sleep(0.05)
    if names:
        raise KafkaException(KafkaError(KafkaError._TIMED_OUT, f"topics not ready: {sorted(names)}"))


def delete_topics(settings: Settings, names: Iterable[str], timeout: float = 15.0) -> None:
    admin = admin_client(settings)
    futs = admin.delete_topics(list(names), request_timeout=timeout)
    for fut in futs.values():
        try:
            fut.result()
        except KafkaException:
            pass


# ---- clear client-side errors (auth and ACL refusals as one line naming the principal) -------------------------------------------------------------------------------

_AUTHZ = {"TOPIC_AUTHORIZATION_FAILED": "topic", "GROUP_AUTHORIZATION_FAILED": "group",
          "TRANSACTIONAL_ID_AUTHORIZATION_FAILED": "transactional id",
          "CLUSTER_AUTHORIZATION_FAILED": "cluster"}


def denial(err: Any) -> str | None:
    """``"authentication"`` or the kind of resource refused (topic, group, ...) when the KafkaError
    ``err`` is an authentication or authorization failure; None for anything else."""
    if err is None:
        return None
    name = err.name()
    if name in _AUTHZ:
        return _AUTHZ[name]
    if name in ("_AUTHENTICATION", "SASL_AUTHENTICATION_FAILED") or "SASL authentication" in err.str():
        return "authentication"
    return None


def denied_message(settings: Settings, err: Any, resource: str = "") -> str:
    """One line for an operator: which principal was refused what, and what to check."""
    who = f"User:{settings.kafka_sasl_username}" if settings.kafka_sasl_username else "ANONYMOUS"
    kind = denial(err) or "access"
    if kind == "authentication":
        return (f"Kafka at {settings.bootstrap()} rejected the credentials of {who} ({err.str()}); "
                "check SQIS_KAFKA_SASL_USERNAME / SQIS_KAFKA_SASL_PASSWORD (`sqis stack env --role ROLE`)")
    what = f" {kind} {resource}" if resource else f" {kind}"
    return (f"Kafka denied {who} access to{what} ({err.name()}); this principal has no ACL for it: "
            "use the right role (`sqis stack env --role ROLE`) or grant the ACL")


def topic_wire_formats(settings: Settings, topic: str, samples: int = 50, timeout_s: float = 10.0) -> dict[str, int]:
    """How many of the last ``samples`` records of each partition of ``topic`` are in each wire format
    (``confluent``, ``sqis-header``, ``unknown``): tells whether a rollout (#19) is done. Reads with
    ``assign`` (no group, nothing committed)."""
    from schemas.serde import WIRE_LEGACY, WIRE_REGISTRY, wire_format

    counts = {WIRE_REGISTRY: 0, WIRE_LEGACY: 0, "unknown": 0}
    c = Consumer(_common(settings) | {"group.id": "sqis-format-probe", "enable.auto.commit": False,
                                      "isolation.level": "read_committed"})
    try:
        md = c.list_topics(topic, timeout=timeout_s).topics.get(topic)
        if md is None or md.error is not None:
            raise BrokerUnavailable(f"topic {topic} not found")
        want: dict[int, int] = {}
        tps = []
        for p in md.partitions:
            lo, hi = watermarks(c, TopicPartition(topic, p), timeout_s)
            if hi > lo:
                want[p] = hi
                tps.append(TopicPartition(topic, p, max(lo, hi - samples)))
        if not tps:
            return counts
        c.assign(tps)
        deadline = time.monotonic() + timeout_s
        while want and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            counts[wire_format(m.value(), m.headers())] += 1
            if m.offset() + 1 >= want.get(m.partition(), 0):
                want.pop(m.partition(), None)
    finally:
        c.close()
    return counts
