"""Shared Prometheus pieces: the health/metrics HTTP server, producer/sink/model metrics, consumer lag.

Every long-running process serves ``/metrics`` (Prometheus text), ``/healthz`` (alive: the
process's loop is turning) and ``/readyz`` (ready: connected and doing its job) on one port
(``SQIS_METRICS_PORT``); Kubernetes probes and Prometheus use the same endpoints.

Consumer lag, per group and partition, is ``end - committed offset`` (``end - low`` when the group
never committed), where ``end`` is the *last stable offset* (ListOffsets with isolation level
read_committed), so records of a transaction still open are not lag yet (they cannot be consumed), and a
trailing commit marker is not lag either (see ``_only_markers_left``). Every consumer process samples the lag of its own group(s) in a background thread
(:class:`LagExporter`, its own clients, never the poll thread); ``sqis lag`` prints the same numbers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

MS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000)

# ---- metrics shared by several roles (defined once: a name is registered once per process) --------

MODEL_INFO = Info("sqis_model", "the model a worker serves (name, version, providers)", ["worker_id"])
SINK_WRITE_MS = Histogram("sqis_sink_write_ms", "one sink write (a batch / an object / a message) in ms",
                          ["sink"], buckets=MS_BUCKETS)
SINK_RETRIES = Counter("sqis_sink_retries_total", "sink write attempts that failed and were retried", ["sink"])
SINK_ROWS = Counter("sqis_sink_inspections_total", "inspections persisted by a sink, by line and verdict",
                    ["sink", "line_id", "verdict"])
SINK_DLQ = Counter("sqis_sink_dlq_total", "records a sink sent to the dead-letter topic", ["sink", "reason"])
FRAME_STAGE_MS = Histogram("sqis_frame_stage_ms", "per-frame stage times carried by the Inspections a sink persists "
                           "(queue, fetch, decode, infer, postprocess, segment, total) in ms", ["stage"],
                           buckets=MS_BUCKETS)
END_TO_END_MS = Histogram("sqis_end_to_end_ms", "captured_at -> the inspection persisted by a sink (ms)", ["sink"],
                          buckets=MS_BUCKETS)
ALERTS_FIRED = Counter("sqis_alerts_fired_total", "alerts raised by the stream processors / notifiers",
                       ["kind", "line_id"])
REVIEW_QUEUED = Counter("sqis_review_queued_total", "frames queued for review (active learning), by line, "
                        "reason and source (a frame with two reasons counts under each)", ["line_id", "reason", "source"])
REVIEW_DROPPED = Counter("sqis_review_dropped_total", "marked frames not queued for review: 'rate' (not sampled) "
                         "or 'cap' (the line's per-hour cap reached)", ["line_id", "reason", "why"])


def set_model_info(worker_id: str, name: str, version: str, providers: Sequence[str] = ()) -> None:
    """Record the model a worker serves now (called at start and after every hot swap)."""
    MODEL_INFO.labels(worker_id=worker_id).info(
        {"model_name": str(name), "model_version": str(version), "providers": ",".join(providers)})


# ---- producers: counters read from ProducerStats at scrape time ------------------------------------

PRODUCER_COUNTS = ("captured", "produced", "skipped_duplicates", "dropped", "spooled", "replayed", "evicted",
                   "failed", "throttled", "reconnects")


class ProducerCollector(Collector):
    """``sqis_producer_frames_total{outcome}`` and spool gauges from the latest stats snapshot.

    The producer pipeline already keeps exact counters (ProducerStats); exporting them on scrape
    keeps the capture/publish hot path free of metric calls.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self._snap: dict[str, int] = {}
        self._lock = threading.Lock()

    def update(self, snapshot: Mapping[str, int]) -> None:
        with self._lock:
            self._snap = dict(snapshot)

    def describe(self) -> Iterable[Any]:
        return self._families({})

    def collect(self) -> Iterable[Any]:
        with self._lock:
            snap = dict(self._snap)
        return self._families(snap)

    def _families(self, snap: Mapping[str, int]) -> Iterator[Any]:
        frames = CounterMetricFamily("sqis_producer_frames", "frames by outcome since the producer started",
                                     labels=["source", "outcome"])
        for k in PRODUCER_COUNTS:
            frames.add_metric([self.source, k], float(snap.get(k, 0)))
        yield frames
        spool = GaugeMetricFamily("sqis_producer_spool_frames", "frames waiting in the on-disk spool",
                                  labels=["source"])
        spool.add_metric([self.source], float(snap.get("spool", 0)))
        yield spool
        deg = GaugeMetricFamily("sqis_producer_degraded", "1 while the broker or store is unreachable (spooling)",
                                labels=["source"])
        deg.add_metric([self.source], float(snap.get("degraded", 0)))
        yield deg


# ---- consumer lag ----------------------------------------------------------------------------------

PartKey = tuple[str, int]


@dataclass(frozen=True)
class PartitionLag:
    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group never committed this partition
    high: int
    lag: int


def consumer_lag(group: str, committed: Mapping[PartKey, int | None], watermarks: Mapping[PartKey, tuple[int, int]],
                 ) -> list[PartitionLag]:
    """Lag per partition as Apache Kafka defines it: high watermark - committed offset.

    ``watermarks`` maps (topic, partition) to (low, high); ``committed`` to the group's committed
    offset (None or negative: none). Without a commit the group would start at the low watermark
    (``auto.offset.reset=earliest``), so everything retained is lag. A commit below the low
    watermark (retention deleted it) also counts from the low watermark. Never negative.
    """
    out = []
    for (topic, part), (low, high) in sorted(watermarks.items()):
        c = committed.get((topic, part))
        c = None if c is None or c < 0 else c
        start = low if c is None else max(c, low)
        out.append(PartitionLag(group, topic, part, c, high, max(0, high - start)))
    return out


def _retrying(call: Callable[[], Any], attempts: int = 6, first_delay_s: float = 0.2) -> Any:
    """``call()`` retried with backoff while the broker answers a retriable error (e.g. the group
    coordinator still loading ``__consumer_offsets`` on a fresh broker); the last error is raised."""
    from confluent_kafka import KafkaError, KafkaException

    transient = {KafkaError.COORDINATOR_LOAD_IN_PROGRESS, KafkaError.COORDINATOR_NOT_AVAILABLE,
                 KafkaError.NOT_COORDINATOR, KafkaError._TIMED_OUT, KafkaError.REQUEST_TIMED_OUT}
    delay = first_delay_s
    for attempt in range(attempts):
        try:
            return call()
        except KafkaException as exc:
            err = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else None
            if attempt == attempts - 1 or err is None or not (err.retriable() or err.code() in transient):
                raise
            time.sleep(delay)
            delay = min(delay * 2, 2.0)
    raise AssertionError("unreachable")


def read_lag(settings: Any, groups: Mapping[str, Sequence[str]], *, admin: Any = None,
             readers: dict[str, Any] | None = None, timeout_s: float = 10.0) -> list[PartitionLag]:
    """Lag of each group on every partition of its topics, from the broker.

    The ends come from ListOffsets with isolation level read_committed (the last stable offset) and
    the earliest offsets, through the admin client. Committed offsets are fetched by a *reader* per
    group: a read_committed consumer with the group's id that never subscribes (so never joins) and
    never commits; it also reads past transaction markers (``_only_markers_left``). The admin API's
    OffsetFetch is not used: librdkafka 2.16 crashes the process when it gets a retriable error
    (coordinator still loading). ``readers`` (group -> consumer) may be kept by the caller across
    samples; otherwise they are made and closed here. Missing topics are skipped.
    """
    from confluent_kafka import IsolationLevel, TopicPartition
    from confluent_kafka.admin import OffsetSpec

    from infra.kafka import admin_client

    admin = admin or admin_client(settings)
    own = readers is None
    readers = {} if readers is None else readers
    try:
        md = admin.list_topics(timeout=timeout_s)
        out: list[PartitionLag] = []
        for group, topics in groups.items():
            tps = [TopicPartition(t, p) for t in topics if t in md.topics for p in sorted(md.topics[t].partitions)]
            if not tps:
                continue
            reader = readers.get(group) or readers.setdefault(group, group_reader(settings, group))
            got = _retrying(lambda r=reader, tps=tps: r.committed(tps, timeout=timeout_s))
            committed = {(tp.topic, tp.partition): tp.offset for tp in got}

            def offsets(spec: Any, tps: list[Any] = tps) -> dict[PartKey, int]:
                futs = admin.list_offsets({tp: spec for tp in tps}, isolation_level=IsolationLevel.READ_COMMITTED,
                                          request_timeout=timeout_s)
                return {(tp.topic, tp.partition): f.result(timeout=timeout_s).offset for tp, f in futs.items()}

            lows = _retrying(lambda o=offsets: o(OffsetSpec.earliest()))
            ends = _retrying(lambda o=offsets: o(OffsetSpec.latest()))
            lags = consumer_lag(group, committed, {k: (lows[k], ends[k]) for k in ends})
            near = [p for p in lags if p.committed is not None and 0 < p.lag <= MARKER_CHECK_MAX_LAG]
            markers_only = _only_markers_left(reader, near, timeout_s) if near else set()
            out += [PartitionLag(p.group, p.topic, p.partition, p.committed, p.high, 0)
                    if (p.topic, p.partition) in markers_only else p for p in lags]
        return out
    finally:
        if own:
            for r in readers.values():
                r.close()


def committed_topics(settings: Any, group: str, topics: Sequence[str], *, admin: Any = None,
                     timeout_s: float = 10.0) -> list[str]:
    """Those of ``topics`` on which ``group`` committed an offset (one reader, closed before returning)."""
    from confluent_kafka import TopicPartition

    from infra.kafka import admin_client

    admin = admin or admin_client(settings)
    md = admin.list_topics(timeout=timeout_s)
    tps = [TopicPartition(t, p) for t in topics if t in md.topics for p in md.topics[t].partitions]
    if not tps:
        return []
    reader = group_reader(settings, group)
    try:
        got = _retrying(lambda: reader.committed(tps, timeout=timeout_s))
    finally:
        reader.close()
    return sorted({tp.topic for tp in got if tp.offset >= 0})


MARKER_CHECK_MAX_LAG = 3  # a lag this small may be transaction markers only: read to know


def _only_markers_left(probe: Any, lags: Sequence[PartitionLag], timeout_s: float) -> set[PartKey]:
    """Partitions whose records in [committed, end) are all transaction markers (or aborted).

    A consumer stores ``offset + 1`` of the last record it processed; the commit marker written after
    that record by a transactional producer sits at that offset, so end - committed reads 1 though
    nothing is left to consume. The read_committed probe reads from the committed offset: when its
    position reaches the end without returning a record, the lag is 0.
    """
    from confluent_kafka import TopicPartition

    if not lags:
        return set()
    ends = {(p.topic, p.partition): p.high for p in lags}
    has_records: set[PartKey] = set()
    done: set[PartKey] = set()
    probe.assign([TopicPartition(p.topic, p.partition, p.committed) for p in lags])
    try:
        deadline = time.monotonic() + min(2.0, timeout_s)
        while len(done) + len(has_records) < len(ends) and time.monotonic() < deadline:
            while (msg := probe.poll(0.1)) is not None:  # drain what was fetched before reading positions
                if not msg.error():
                    has_records.add((msg.topic(), msg.partition()))
            pending = [TopicPartition(t, p) for t, p in ends if (t, p) not in has_records | done]
            for tp in probe.position(pending) if pending else ():
                if tp.offset >= ends[(tp.topic, tp.partition)]:
                    done.add((tp.topic, tp.partition))
    finally:
        probe.unassign()
    return done - has_records


def group_reader(settings: Any, group: str) -> Any:
    """A read_committed consumer with ``group``'s id that only asks for committed offsets and assign()s:
    it never subscribes (never joins the group, never disturbs its members) and never commits."""
    from infra.kafka import consumer

    return consumer(settings, group_id=group, client_id="sqis-lag",
                    **{"isolation.level": "read_committed", "enable.auto.commit": False})


def discover_groups(settings: Any, topics: Sequence[str], *, only: Sequence[str] = (), admin: Any = None,
                    timeout_s: float = 10.0) -> dict[str, list[str]]:
    """Every consumer group (or those in ``only``) that committed offsets on one of ``topics`` -> those topics."""
    from infra.kafka import admin_client

    admin = admin or admin_client(settings)
    listed = admin.list_consumer_groups(request_timeout=timeout_s).result(timeout=timeout_s)
    names = sorted(x.group_id for x in listed.valid if not only or x.group_id in only)
    out: dict[str, list[str]] = {}
    for g in names:
        mine = committed_topics(settings, g, topics, admin=admin, timeout_s=timeout_s)
        if mine:
            out[g] = mine
    return out


class LagCollector(Collector):
    """``sqis_consumer_lag{group,topic,partition}`` and ``sqis_consumer_committed_offset`` from the latest
    sample (set with :meth:`update`; a scrape never queries the broker)."""

    def __init__(self) -> None:
        self._lags: list[PartitionLag] = []
        self._lock = threading.Lock()

    def update(self, lags: Sequence[PartitionLag]) -> None:
        with self._lock:
            self._lags = list(lags)

    def describe(self) -> Iterable[Any]:
        return []  # unchecked: a process may run several exporters (one per group), each its own series

    def collect(self) -> Iterable[Any]:
        with self._lock:
            lags = list(self._lags)
        return self._families(lags)

    @staticmethod
    def _families(lags: Sequence[PartitionLag]) -> Iterator[Any]:
        lag = GaugeMetricFamily("sqis_consumer_lag", "last stable offset - committed offset, per group and partition",
                                labels=["group", "topic", "partition"])
        off = GaugeMetricFamily("sqis_consumer_committed_offset", "the group's committed offset (-1: none)",
                                labels=["group", "topic", "partition"])
        for p in lags:
            lag.add_metric([p.group, p.topic, str(p.partition)], float(p.lag))
            off.add_metric([p.group, p.topic, str(p.partition)], float(-1 if p.committed is None else p.committed))
        yield lag
        yield off


class LagExporter:
    """Samples the lag of ``group`` on ``topics`` (or of several groups: pass a mapping) every
    ``interval_s`` in a daemon thread with its own clients (an admin client, a reader per group), and exports it
    through a :class:`LagCollector` registered in ``registry``. ``close()`` stops and unregisters.

    A failed sample is logged (once per distinct error while it persists) and keeps the last values;
    ``last_error`` says why, for a readiness check.
    """

    def __init__(self, settings: Any, group: str | Mapping[str, Sequence[str]], topics: Sequence[str] = (), *,
                 registry: CollectorRegistry = REGISTRY, interval_s: float = 10.0) -> None:
        self.settings = settings
        self.groups: dict[str, list[str]] = ({group: list(topics)} if isinstance(group, str)
                                             else {g: list(t) for g, t in group.items()})
        self.interval_s = interval_s
        self.collector = LagCollector()
        self.registry = registry
        self.last_error: str | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._sampled = threading.Event()
        registry.register(self.collector)
        self._thread = threading.Thread(target=self._run, name="lag-exporter", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from infra.kafka import admin_client

        readers: dict[str, Any] = {}  # one per group, kept across samples, closed when stopping
        try:
            self._sample_until_stopped(admin_client, readers)
        finally:
            for r in readers.values():
                r.close()

    def _sample_until_stopped(self, admin_client: Callable[[Any], Any], readers: dict[str, Any]) -> None:
        admin = None
        while not self._stop.is_set():
            try:
                admin = admin or admin_client(self.settings)
                self.collector.update(read_lag(self.settings, self.groups, admin=admin, readers=readers,
                                               timeout_s=min(10.0, max(1.0, self.interval_s))))
                if self.last_error is not None:
                    log.info("consumer lag readable again", extra={"groups": list(self.groups)})
                self.last_error = None
                self.samples += 1
            except Exception as exc:  # the process goes on: lag is best-effort telemetry
                if str(exc) != self.last_error:
                    log.warning("consumer lag sample failed", extra={"groups": list(self.groups), "error": str(exc)})
                self.last_error = str(exc)
            self._sampled.set()
            self._stop.wait(self.interval_s)

    def wait_sampled(self, timeout_s: float) -> bool:
        """True once a first sample was attempted (for tests and one-shot tools)."""
        return self._sampled.wait(timeout_s)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(15)
        with contextlib.suppress(KeyError):
            self.registry.unregister(self.collector)


def lag_exporter(settings: Any, group: str | Mapping[str, Sequence[str]], topics: Sequence[str] = (), *,
                 registry: CollectorRegistry = REGISTRY) -> LagExporter | None:
    """The lag of a consumer process's own group(s), sampled every ``settings.lag_interval_s`` next to its
    metrics server: None without a port."""
    if settings.metrics_port is None:
        return None
    return LagExporter(settings, group, topics, registry=registry, interval_s=settings.lag_interval_s)


# ---- the HTTP server: /metrics, /healthz, /readyz --------------------------------------------------

Check = Callable[[], bool]


class HealthServer:
    """A small threaded HTTP server for one process: /metrics, /healthz (live) and /readyz (ready)."""

    def __init__(self, port: int, *, host: str = "0.0.0.0", registry: CollectorRegistry = REGISTRY,
                 live: Check | None = None, ready: Check | None = None) -> None:
        self.registry = registry
        self.live: Check = live or (lambda: True)
        self.ready: Check = ready or (lambda: True)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(server.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/livez"):
                    self._probe(server.live)
                elif path == "/readyz":
                    self._probe(server.ready)
                else:
                    self._send(404, b"not found\n")

            def _probe(self, check: Check) -> None:
                try:
                    ok = bool(check())
                except Exception as exc:  # a failing check is "not ok", never a 500 with a traceback
                    ok = False
                    log.warning("health check raised", extra={"error": str(exc)})
                self._send(200 if ok else 503, b"ok\n" if ok else b"not ok\n")

            def _send(self, code: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:  # scrapes every few seconds: keep logs quiet
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name=f"metrics-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving /metrics /healthz /readyz", extra={"port": self.port})

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)


class Heartbeat:
    """Liveness for a poll loop: ``beat()`` every iteration; alive while the last beat is recent."""

    def __init__(self, max_age_s: float = 60.0) -> None:
        self.max_age_s = max_age_s
        self._last = time.monotonic()

    def beat(self) -> None:
        self._last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self._last < self.max_age_s


def serve(port: int | None, **kw: Any) -> HealthServer | None:
    """Start a HealthServer when a port is configured; a taken port is logged, not fatal."""
    if port is None:
        return None
    try:
        return HealthServer(port, **kw)
    except OSError as exc:
        log.warning("cannot serve /metrics", extra={"port": port, "error": str(exc)})
        return None


class ProducerMetrics:
    """A producer process's metrics endpoint: ProducerCollector + HealthServer (no-op without a port).

    Alive while progress snapshots keep coming; ready while not degraded (not spooling).
    """

    def __init__(self, source: str, port: int | None, *, registry: CollectorRegistry = REGISTRY,
                 max_silence_s: float = 60.0) -> None:
        self.collector = ProducerCollector(source)
        self._at = time.monotonic()
        self._degraded = False
        self.server: HealthServer | None = None
        if port is not None:
            registry.register(self.collector)
            self.server = serve(port, registry=registry, live=lambda: time.monotonic() - self._at < max_silence_s,
                                ready=lambda: not self._degraded)

    def update(self, snapshot: Mapping[str, int]) -> None:
        self.collector.update(snapshot)
        self._at = time.monotonic()
        self._degraded = bool(snapshot.get("degraded", 0))

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
