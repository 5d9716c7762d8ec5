"""Shared Prometheus pieces: the health/metrics HTTP server, producer/sink/model metrics, consumer lag.

Every long-running process serves ``/metrics`` (Prometheus text), ``/healthz`` (alive: the
process's loop is turning) and ``/readyz`` (ready: connected and doing its job) on one port
(``SQIS_METRICS_PORT``); Kubernetes probes and Prometheus use the same endpoints.

Consumer lag is computed for Apache Kafka: per partition, ``high watermark - committed offset``
(``high - low`` when the group never committed). The arithmetic is the pure ``consumer_lag``; the
local tansu broker reports wrong high watermarks (see docs/RUNBOOK.md), so lag read from it is wrong
and tests check the arithmetic with given offsets.
"""

from __future__ import annotations

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


class LagCollector(Collector):
    """``sqis_consumer_lag{group,topic,partition}`` and ``sqis_consumer_committed_offset`` per scrape.

    Reads committed offsets with the admin API and the high watermarks with a consumer that never
    joins a group; results are cached for ``min_interval_s`` so several scrapers do not hammer the broker.
    """

    def __init__(self, settings: Any, groups: Mapping[str, Sequence[str]], *, min_interval_s: float = 5.0) -> None:
        self.settings = settings
        self.groups = dict(groups)  # group -> topics it consumes
        self.min_interval_s = min_interval_s
        self._cache: tuple[float, list[PartitionLag]] = (0.0, [])
        self._lock = threading.Lock()
        self.last_error: str | None = None

    def read(self) -> list[PartitionLag]:
        """Lag of every configured group on every partition of its topics (queries the broker)."""
        from confluent_kafka import ConsumerGroupTopicPartitions, TopicPartition

        from infra.kafka import admin_client, consumer

        admin = admin_client(self.settings)
        probe = consumer(self.settings, group_id="sqis-lag-probe", client_id="sqis-lag-probe")
        try:
            md = admin.list_topics(timeout=10)
            out: list[PartitionLag] = []
            for group, topics in self.groups.items():
                tps = [TopicPartition(t, p) for t in topics if t in md.topics for p in md.topics[t].partitions]
                if not tps:
                    continue
                fut = admin.list_consumer_group_offsets([ConsumerGroupTopicPartitions(group, tps)])[group]
                committed = {(tp.topic, tp.partition): tp.offset for tp in fut.result(timeout=10).topic_partitions}
                marks = {(tp.topic, tp.partition): probe.get_watermark_offsets(tp, timeout=10, cached=False)
                         for tp in tps}
                out += consumer_lag(group, committed, marks)
            return out
        finally:
            probe.close()

    def _current(self) -> list[PartitionLag]:
        with self._lock:
            at, cached = self._cache
            if time.monotonic() - at < self.min_interval_s:
                return cached
            try:
                lags = self.read()
                self.last_error = None
            except Exception as exc:  # a scrape must not fail because the broker is slow
                self.last_error = str(exc)
                log.warning("consumer lag read failed", extra={"error": str(exc)})
                lags = cached
            self._cache = (time.monotonic(), lags)
            return lags

    def describe(self) -> Iterable[Any]:
        return self._families([])

    def collect(self) -> Iterable[Any]:
        return self._families(self._current())

    @staticmethod
    def _families(lags: Sequence[PartitionLag]) -> Iterator[Any]:
        lag = GaugeMetricFamily("sqis_consumer_lag", "high watermark - committed offset, per group and partition",
                                labels=["group", "topic", "partition"])
        off = GaugeMetricFamily("sqis_consumer_committed_offset", "the group's committed offset (-1: none)",
                                labels=["group", "topic", "partition"])
        for p in lags:
            lag.add_metric([p.group, p.topic, str(p.partition)], float(p.lag))
            off.add_metric([p.group, p.topic, str(p.partition)], float(-1 if p.committed is None else p.committed))
        yield lag
        yield off


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
